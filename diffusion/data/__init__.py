"""Data: LightningDataModules serving uint8 image batches (B, C, H, W); scaling to [-1, 1] happens on the device."""

from diffusion.data.datamodule import ImageDataModule
from diffusion.data.digits import DigitsDataModule

__all__ = ["ImageDataModule", "DigitsDataModule"]
