"""Tests of diffusion/processes/: the forward processes and their math."""
