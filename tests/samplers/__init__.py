"""Tests of diffusion/samplers/."""
