"""The forward processes, each a configured object (``conf/process/<kind>.yaml``): :mod:`.gaussian` (Ho et al.),
:mod:`.blur` (cold diffusion). :mod:`.base` says what every process offers."""

from diffusion.processes.base import ForwardProcess, build_process, randn
from diffusion.processes.blur import BlurDiffusion, BlurSchedule
from diffusion.processes.gaussian import GaussianDiffusion

__all__ = ["ForwardProcess", "build_process", "GaussianDiffusion", "BlurDiffusion", "BlurSchedule", "randn"]
