"""Tests of diffusion/run/: the run machinery (errors, clusters, requeue, sweeps)."""
