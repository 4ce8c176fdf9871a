"""Tests of diffusion/data/ (and, under legacy/, files earlier versions wrote)."""
