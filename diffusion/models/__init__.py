"""Epsilon-prediction networks: ``model(x_t, t) -> eps`` with the output shaped like the input."""

from diffusion.models.simple_unet import SimpleUNet
from diffusion.models.unet import UNet

__all__ = ["UNet", "SimpleUNet"]
