"""Reverse-process samplers: :mod:`.base` (the loop and its hooks), one file per family (:mod:`.ddpm`, :mod:`.ddim`,
:mod:`.cold`, ...) and :mod:`.registry`, the one list (``conf/sampler/*.yaml``) that every CLI reads."""

from diffusion.samplers.base import SPACINGS, SampleOutput, Sampler, StepOutput, make_timesteps
from diffusion.samplers.registry import build_sampler, sampler_config, sampler_name, sampler_names

__all__ = ["Sampler", "SampleOutput", "StepOutput", "make_timesteps", "SPACINGS", "build_sampler", "sampler_config",
           "sampler_name", "sampler_names"]
