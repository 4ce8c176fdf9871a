"""The torch-free checks of the continuous-time processes' settings (``process=edm``, ``process=flow``): read by
the processes' constructors and by ``diffusion.train`` before it imports torch, so that a bad value answers in one
line in about a second (exit 2), naming the value and what is allowed.
"""

from __future__ import annotations

import math

__all__ = ["FLOW_OBJECTIVES", "FLOW_TIMESTEP_SAMPLINGS", "CONTINUOUS_KINDS", "CONTINUOUS_TARGETS", "continuous_kind",
           "check_edm", "check_flow", "check_positive", "check_real", "check_no_schedule"]

FLOW_OBJECTIVES = ("v", "x0", "eps")
FLOW_TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
#: the processes that take no beta schedule (``schedule=none``): time is continuous
CONTINUOUS_KINDS = ("edm", "flow")
#: their class paths as configs name them (the package's lazy export and the module's own) -> their kind
CONTINUOUS_TARGETS = {"diffusion.processes.EDMProcess": "edm", "diffusion.processes.edm.EDMProcess": "edm",
                      "diffusion.processes.FlowMatching": "flow", "diffusion.processes.flow.FlowMatching": "flow"}
#: what sets each one's noise levels instead of a beta schedule
NOISE_LEVELS = {"edm": "its noise levels are process.sigma_min, sigma_max, P_mean, P_std",
                "flow": "its times are process.timestep_sampling and process.shift"}
#: the ``_target_`` of ``conf/schedule/none.yaml``
NO_SCHEDULE_TARGET = "diffusion.processes.schedules.NoSchedule"


def check_real(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it must be a finite number")
    return float(value)


def check_positive(name: str, value, what: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it must be a finite number > 0{what}")
    return float(value)


def check_edm(sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0) -> None:
    """EDM's settings (Karras et al. 2022, Table 1): sigma_data, P_std > 0, a finite P_mean, 0 < sigma_min < sigma_max."""
    check_positive("process.sigma_data", sigma_data, " (the data's standard deviation; 0.5 for images in [-1, 1])")
    check_real("process.P_mean", P_mean)
    check_positive("process.P_std", P_std, " (the std of ln sigma in training; EDM: 1.2)")
    lo = check_positive("process.sigma_min", sigma_min, " (EDM: 0.002)")
    hi = check_positive("process.sigma_max", sigma_max, " (EDM: 80)")
    if lo >= hi:
        raise ValueError(f"process.sigma_min={sigma_min!r} is invalid with process.sigma_max={sigma_max!r}: "
                         "sampling needs sigma_min < sigma_max (EDM: 0.002 and 80)")


def check_flow(objective="v", timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
               shift=1.0) -> None:
    """Flow matching's settings: the objective and the training-time distribution (Esser et al. 2024, section 3.1)."""
    if objective not in FLOW_OBJECTIVES:
        raise ValueError(f"process.objective={objective!r} is invalid for process=flow: allowed values are "
                         f"{', '.join(FLOW_OBJECTIVES)} (v: the velocity eps - x0)")
    if timestep_sampling not in FLOW_TIMESTEP_SAMPLINGS:
        raise ValueError(f"process.timestep_sampling={timestep_sampling!r} is invalid for process=flow: allowed "
                         f"values are {', '.join(FLOW_TIMESTEP_SAMPLINGS)}")
    check_real("process.logit_mean", logit_mean)
    check_positive("process.logit_std", logit_std, " (the s of logit-normal t; Esser et al.: 1)")
    scale = check_real("process.mode_scale", mode_scale)
    if not -1 <= scale <= 2 / (math.pi - 2):
        raise ValueError(f"process.mode_scale={mode_scale!r} is invalid: it must lie in [-1, {2 / (math.pi - 2):.4f}] "
                         "(Esser et al. eq. 20: the density stays positive; 1.29 is theirs)")
    check_positive("process.shift", shift, " (Esser et al.'s resolution shift; 1: none, 3: SD3 at 1024 px)")


def continuous_kind(target) -> str | None:
    """``edm`` or ``flow`` for a continuous-time process's ``_target_``; None for any other."""
    return CONTINUOUS_TARGETS.get(str(target))


def check_no_schedule(kind: str, schedule_target) -> None:
    """A continuous-time process has no beta schedule: ``schedule=none`` (what its yaml selects); ``schedule_target``
    is the configured schedule's class path (None: no schedule)."""
    if schedule_target is not None and str(schedule_target) != NO_SCHEDULE_TARGET:
        raise ValueError(f"schedule {str(schedule_target).rsplit('.', 1)[-1]} is invalid for process={kind}: it has no beta "
                         f"schedule ({NOISE_LEVELS[kind]}); leave schedule at none")
