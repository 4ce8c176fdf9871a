"""Noise schedules: a choice of ``betas`` and the table of quantities every later step derives from them.

Each schedule is a small class (selectable in Hydra's ``schedule`` group by ``_target_``) whose only job is
``betas()``, a float64 vector of length ``T``. :meth:`NoiseSchedule.table` turns it into the quantities of
Ho et al. (2020) -- ``alphas``, ``alphas_cumprod``, ``posterior_variance`` ... -- computed in float64 and
handed out as float32 in one immutable :class:`ScheduleTable`.

Timesteps are 0-based throughout the package: index ``t`` in ``0..T-1`` is the paper's step ``t + 1``, so
``alphas_cumprod[0] = 1 - betas[0]`` is the first noisy step and ``alphas_cumprod[T-1]`` the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the classes and their checks load without torch (diffusion.train checks schedule.* before it)
    import torch

__all__ = [
    "NoiseSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "ContinuousCosineSchedule",
    "QuadraticSchedule",
    "SigmoidSchedule",
    "NoSchedule",
    "check_continuous",
    "ScheduleTable",
    "compute_table",
]


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"schedule T={T!r} is invalid: the number of diffusion steps must be an integer >= 1")
    return T


def _check_open_unit(name: str, value, low_closed: bool = False, high_closed: bool = False) -> float:
    ok_low = value >= 0 if low_closed else value > 0
    ok_high = value <= 1 if high_closed else value < 1
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (ok_low and ok_high):
        interval = ("[" if low_closed else "(") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"schedule {name}={value!r} is invalid: it must lie in {interval}")
    return float(value)


@dataclass(frozen=True)
class ScheduleTable:
    """Every per-timestep quantity of the forward process and its posterior (Ho et al. 2020, eq. 4, 6, 7).

    All tensors are 1-D float32 of length ``T``, indexed by the 0-based timestep.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def compute_table(
    betas: torch.Tensor,
    sqrt_alphas_cumprod: torch.Tensor | None = None,
    sqrt_one_minus_alphas_cumprod: torch.Tensor | None = None,
) -> ScheduleTable:
    """Derive the whole table from float64 ``betas``.

    A schedule defined by its signal/noise rates (continuous cosine) may pass them directly so that they are not
    recomputed through ``sqrt(1 - alphas_cumprod)`` with its cancellation error.
    """
    import torch

    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 1:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = betas[(betas <= 0) | (betas >= 1)][0].item()
        raise ValueError(f"schedule produced beta={bad!r}: every beta must lie in (0, 1)")
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    if sqrt_alphas_cumprod is None:
        sqrt_alphas_cumprod = alphas_cumprod.sqrt()
    if sqrt_one_minus_alphas_cumprod is None:
        sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta~_t I)          (Ho et al. eq. 6-7)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~_0 = 0: the log is clipped to beta~_1 as in Ho et al.'s and Nichol & Dhariwal's code.
    if betas.numel() > 1:
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
    else:
        clipped = betas.clone()
    table = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=torch.as_tensor(sqrt_alphas_cumprod, dtype=torch.float64),
        sqrt_one_minus_alphas_cumprod=torch.as_tensor(sqrt_one_minus_alphas_cumprod, dtype=torch.float64),
        log_one_minus_alphas_cumprod=torch.log1p(-alphas_cumprod),
        sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=clipped.log(),
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    )
    return ScheduleTable(**{k: v.to(torch.float32) for k, v in table.items()})


class NoiseSchedule:
    """Base class: subclasses define :meth:`betas` (float64, length ``T``)."""

    def __init__(self, T: int = 1000):
        self.T = _check_T(T)

    def betas(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def table(self) -> ScheduleTable:
        return compute_table(self.betas())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _BetaRangeSchedule(NoiseSchedule):
    """Schedules parameterised by ``beta_start < beta_end`` in (0, 1)."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, scale_with_T: bool = False):
        super().__init__(T)
        self.beta_start = _check_open_unit("beta_start", beta_start)
        self.beta_end = _check_open_unit("beta_end", beta_end)
        if self.beta_start >= self.beta_end:
            raise ValueError(
                f"schedule beta_start={beta_start!r} is invalid: it must be smaller than beta_end={beta_end!r}"
            )
        self.scale_with_T = bool(scale_with_T)
        if self.scale_with_T and self._scaled(self.beta_end) >= 1:
            raise ValueError(
                f"schedule beta_end={beta_end!r} with scale_with_T at T={T} gives beta={self._scaled(beta_end):.4g};"
                " every beta must lie in (0, 1): lower beta_end or raise T"
            )

    def _scaled(self, beta: float) -> float:
        # improved-diffusion: scale = 1000 / T keeps the total noise comparable when T changes.
        return beta * 1000.0 / self.T if self.scale_with_T else beta


class LinearSchedule(_BetaRangeSchedule):
    """Ho et al. (2020): betas linear from ``beta_start`` to ``beta_end``."""

    def betas(self) -> torch.Tensor:
        import torch

        return torch.linspace(self._scaled(self.beta_start), self._scaled(self.beta_end), self.T, dtype=torch.float64)


class QuadraticSchedule(_BetaRangeSchedule):
    """Linear in sqrt(beta) ("quad" in Ho et al.'s code, "scaled_linear" in diffusers)."""

    def betas(self) -> torch.Tensor:
        import torch

        lo, hi = math.sqrt(self._scaled(self.beta_start)), math.sqrt(self._scaled(self.beta_end))
        return torch.linspace(lo, hi, self.T, dtype=torch.float64) ** 2


class SigmoidSchedule(_BetaRangeSchedule):
    """Sigmoid of linspace(-6, 6) mapped onto [beta_start, beta_end] (Ho et al.'s code, GeoDiff)."""

    def betas(self) -> torch.Tensor:
        import torch

        lo, hi = self._scaled(self.beta_start), self._scaled(self.beta_end)
        return torch.sigmoid(torch.linspace(-6, 6, self.T, dtype=torch.float64)) * (hi - lo) + lo


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).

    ``beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), max_beta)``, the clip preventing the singularity at t = T.
    """

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        super().__init__(T)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or s < 0:
            raise ValueError(f"schedule s={s!r} is invalid: the cosine offset must be a number >= 0")
        self.s = float(s)
        self.max_beta = _check_open_unit("max_beta", max_beta)

    def alpha_bar(self, u: torch.Tensor) -> torch.Tensor:
        """The continuous alpha_bar at diffusion time ``u = t / T`` in [0, 1]."""
        import torch

        f = torch.cos((u + self.s) / (1 + self.s) * math.pi / 2) ** 2
        return f / math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2

    def betas(self) -> torch.Tensor:
        import torch

        u = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        abar = self.alpha_bar(u)
        return (1 - abar[1:] / abar[:-1]).clamp(max=self.max_beta)


class ContinuousCosineSchedule(NoiseSchedule):
    """Signal rate cos(theta), noise rate sin(theta), theta linear in diffusion time (Keras DDIM example).

    theta runs from ``arccos(max_signal_rate)`` at t = 0 to ``arccos(min_signal_rate)`` at t = T-1, so the
    first step keeps ``max_signal_rate`` of the signal and the last ``min_signal_rate`` (so ``beta_0 = 1 -
    max_signal_rate^2`` is larger than the next betas: the clean image is never a training input). The discretised
    ``alphas_cumprod = cos^2(theta)`` gives betas that every sampler in the package can use.
    """

    def __init__(self, T: int = 1000, min_signal_rate: float = 0.02, max_signal_rate: float = 0.95):
        super().__init__(T)
        self.min_signal_rate = _check_open_unit("min_signal_rate", min_signal_rate)
        self.max_signal_rate = _check_open_unit("max_signal_rate", max_signal_rate, high_closed=True)
        if self.min_signal_rate >= self.max_signal_rate:
            raise ValueError(
                f"schedule min_signal_rate={min_signal_rate!r} is invalid: "
                f"it must be smaller than max_signal_rate={max_signal_rate!r}"
            )

    def angles(self) -> torch.Tensor:
        import torch

        start, end = math.acos(self.max_signal_rate), math.acos(self.min_signal_rate)
        return torch.linspace(start, end, self.T, dtype=torch.float64)

    def betas(self) -> torch.Tensor:
        import torch

        abar = torch.cos(self.angles()) ** 2
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # max_signal_rate = 1 would make beta_0 = 0; floor it so that every derived quantity stays finite.
        return (1 - abar / prev).clamp(min=1e-12, max=0.999)

    def table(self) -> ScheduleTable:
        import torch

        theta = self.angles()
        betas = self.betas()
        if float(betas.max()) >= 0.999 or self.max_signal_rate == 1.0:
            return compute_table(betas)  # clipped: the rates must follow the betas actually used
        return compute_table(betas, sqrt_alphas_cumprod=torch.cos(theta), sqrt_one_minus_alphas_cumprod=torch.sin(theta))


class NoSchedule:
    """The ``schedule`` of a continuous-time process (``process=edm``, ``process=flow``): there is no beta table;
    the noise levels are the process's own settings (``conf/schedule/none.yaml``, which those processes select)."""

    def __repr__(self) -> str:
        return "NoSchedule()"


def check_continuous(kind: str, schedule, learn_sigma: bool) -> None:
    """What a continuous-time process refuses in one line: a beta schedule (the check ``diffusion.train`` makes
    before torch, on the built schedule) and a learned variance (its samplers integrate an ODE)."""
    from diffusion.processes.settings import check_no_schedule

    check_no_schedule(kind, None if schedule is None else f"{type(schedule).__module__}.{type(schedule).__name__}")
    if learn_sigma:
        raise ValueError(f"model.learn_sigma=true is invalid for process={kind}: its samplers integrate an ODE and "
                         "need no variance (leave it at false)")
