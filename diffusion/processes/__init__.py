"""The forward processes and their math, each a configured object (``conf/process/<kind>.yaml``): :mod:`.gaussian`
(Ho et al.), :mod:`.blur` (cold diffusion), :mod:`.edm` (Karras et al.'s preconditioned denoiser), :mod:`.flow`
(flow matching / rectified flow); :mod:`.base` says what every process offers. Beside them the math they
share: :mod:`.schedules` (beta schedules -> one table), :mod:`.objectives` (eps / x0 / v conversions),
:mod:`.timesteps` (how training draws t) and :mod:`.settings` (the continuous processes' torch-free checks).

The package is lazy: ``diffusion.processes.GaussianDiffusion`` imports torch when first used, so that the torch-free
:mod:`.schedules` (the schedules' checks, read by ``diffusion.train`` before any heavy import) loads without it.
"""

from __future__ import annotations

from diffusion.lazy import lazy_exports

#: each public name and the module that defines it
_LAZY = {**dict.fromkeys(("ForwardProcess", "build_process", "randn"), "diffusion.processes.base"),
         **dict.fromkeys(("BlurDiffusion", "BlurSchedule"), "diffusion.processes.blur"),
         "GaussianDiffusion": "diffusion.processes.gaussian",
         "EDMProcess": "diffusion.processes.edm",
         "FlowMatching": "diffusion.processes.flow"}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
