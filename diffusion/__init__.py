"""DDPM research framework: schedules -> forward process -> loss -> samplers, in PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
