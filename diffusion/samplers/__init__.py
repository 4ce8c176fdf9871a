"""Reverse-process samplers: :mod:`.base` (the loop and its hooks), one file per family (:mod:`.ddpm`, :mod:`.ddim`,
:mod:`.cold`, ...) and :mod:`.registry`, the one list (``conf/sampler/*.yaml``) that every CLI reads.

The package is lazy: :mod:`.registry` and :mod:`.controls` load without torch (the CLIs check a sampler's name
before any heavy import); :mod:`.base` and the samplers import it when first used.
"""

from __future__ import annotations

from diffusion.lazy import lazy_exports

#: each public name and the module that defines it
_LAZY = {**dict.fromkeys(("Sampler", "SampleOutput", "StepOutput", "make_timesteps"), "diffusion.samplers.base"),
         "SPACINGS": "diffusion.samplers.controls",
         **dict.fromkeys(("build_sampler", "sampler_config", "sampler_name", "sampler_names"), "diffusion.samplers.registry")}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
