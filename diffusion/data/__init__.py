"""Data: LightningDataModules serving uint8 image batches (B, C, H, W); scaling to [-1, 1] happens on the device."""

from diffusion.data.datamodule import ImageDataModule
from diffusion.data.digits import DigitsDataModule
from diffusion.data.folder import ImageFolderDataModule
from diffusion.data.torchvision_data import TorchvisionDataModule

__all__ = ["ImageDataModule", "DigitsDataModule", "ImageFolderDataModule", "TorchvisionDataModule"]
