"""Epsilon-prediction networks: ``model(x_t, t) -> eps`` with the output shaped like the input.

The package is lazy: ``diffusion.models.UNet`` imports torch when it is first used, so that the torch-free
:mod:`.settings` (the networks' checks, read by the CLIs before any heavy import) loads without it.
"""

from __future__ import annotations

import importlib

#: each public name and the module that defines it
_LAZY = {"UNet": "diffusion.models.unet", "SimpleUNet": "diffusion.models.simple_unet"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
