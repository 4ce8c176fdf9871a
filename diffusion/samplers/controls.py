"""What a person tunes by hand on a sampler (the sampling page draws one widget per :class:`Control`), without
torch: the registry and the CLIs read these before any heavy import."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Control", "SPACINGS", "SPACING_CONTROL", "GUIDANCE_CONTROLS"]

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


@dataclass(frozen=True)
class Control:
    """One option of a sampler that a person tunes by hand (the sampling page draws one widget per control): a
    number in [``minimum``, ``maximum``] on a grid of ``step``, or one of ``choices`` (whole-number options, like
    DPM-Solver's order, are choices).
    The default value is the sampler's yaml's (or a checkpoint's own sampler config's)."""

    name: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | None = None

    def check(self, value: Any) -> Any:
        """``value`` as the sampler takes it, or a one-line ValueError naming it and what is allowed."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"sampler {self.name}={value!r} is invalid: allowed values are "
                                 f"{', '.join(map(str, self.choices))}")
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not self.minimum <= value <= self.maximum:
            raise ValueError(f"sampler {self.name}={value!r} is invalid: it must be a number in "
                             f"[{self.minimum:g}, {self.maximum:g}]")
        return float(value)


#: the timestep grids of the discrete-time samplers, as a control
SPACING_CONTROL = Control("spacing", "timestep spacing (leading: DDIM paper, trailing: Lin et al. 2023)",
                          choices=SPACINGS)


#: classifier-free guidance, which every sampler takes (:mod:`.guidance`): the controls of a class-conditional model
GUIDANCE_CONTROLS = (
    Control("guidance_scale", "guidance scale w (1 conditional, 0 unconditional, > 1 guided)", 0.0, 10.0, 0.5),
    Control("guidance_rescale", "guidance rescale (Lin et al. 2023: 0 off; counters over-saturation at large w)",
            0.0, 1.0, 0.05),
)
