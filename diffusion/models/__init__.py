"""Epsilon-prediction networks: ``model(x_t, t) -> eps`` with the output shaped like the input.

The package is lazy: ``diffusion.models.UNet`` imports torch when it is first used, so that the torch-free
:mod:`.settings` (the networks' checks, read by the CLIs before any heavy import) loads without it.
"""

from __future__ import annotations

from diffusion.lazy import lazy_exports

#: each public name and the module that defines it
_LAZY = {"UNet": "diffusion.models.unet", "SimpleUNet": "diffusion.models.simple_unet"}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
