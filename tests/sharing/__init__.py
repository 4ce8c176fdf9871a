"""Tests of diffusion/sharing/: reading and sharing checkpoints."""
