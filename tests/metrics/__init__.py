"""Tests of diffusion/metrics/."""
