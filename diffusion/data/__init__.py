"""Data: LightningDataModules serving uint8 image batches (B, C, H, W); scaling to [-1, 1] happens on the device.

The package is lazy: ``diffusion.data.DigitsDataModule`` imports Lightning when first used, so that the torch-free
:mod:`.settings` (the data modules' checks, read by ``diffusion.train`` before any heavy import) loads without it.
"""

from __future__ import annotations

import importlib

#: each public name and the module that defines it
_LAZY = {"ImageDataModule": "diffusion.data.datamodule", "DigitsDataModule": "diffusion.data.digits",
         "ImageFolderDataModule": "diffusion.data.folder", "TorchvisionDataModule": "diffusion.data.torchvision_data"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
