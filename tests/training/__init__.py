"""Tests of diffusion/training/: the LightningModule's parts and callbacks."""
