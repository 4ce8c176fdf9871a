"""Data: LightningDataModules serving uint8 image batches (B, C, H, W); scaling to [-1, 1] happens on the device.

The package is lazy: ``diffusion.data.DigitsDataModule`` imports Lightning when first used, so that the torch-free
:mod:`.settings` (the data modules' checks, read by ``diffusion.train`` before any heavy import) loads without it.
"""

from __future__ import annotations

from diffusion.lazy import lazy_exports

#: each public name and the module that defines it
_LAZY = {"ImageDataModule": "diffusion.data.datamodule", "DigitsDataModule": "diffusion.data.digits",
         "ImageFolderDataModule": "diffusion.data.folder", "TorchvisionDataModule": "diffusion.data.torchvision_data"}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
