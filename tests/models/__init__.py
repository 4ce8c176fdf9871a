"""Tests of diffusion/models/."""
