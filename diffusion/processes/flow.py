"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, "Scaling Rectified Flow
Transformers"): the straight path between data and noise, and a network that learns its velocity.

    x_t = (1 - t) x_0 + t eps,  t in [0, 1]  (t = 1: pure noise)                 (Esser et al. eq. 2 with a_t = 1 - t, b_t = t)
    v = dx_t / dt = eps - x_0                                                      (the conditional velocity, eq. 3)
    loss = ||v_theta(x_t, t) - (eps - x_0)||^2                                     (conditional flow matching, eq. 5)

Sampling integrates dx/dt = v(x, t) from t = 1 (x ~ N(0, I)) down to t = 0 (:mod:`diffusion.samplers.flow`).

``objective`` x0 or eps trains the network on that target instead, and the velocity follows from it on the path:
v = (x_t - x_0) / t = (eps - x_t) / (1 - t).

Training draws t (Esser et al. section 3.1) ``uniform``; ``logit_normal``: t = sigmoid(m + s n), n ~ N(0, 1) (their
best, m = 0, s = 1); ``mode``: t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (eq. 20, s = 1.29). Then the
resolution ``shift`` (their section 5.3.2, SD3's ``shift``): t' = shift t / (1 + (shift - 1) t), which moves the
draws (and the samplers' grids) towards the noise end for shift > 1. The network's time input is 1000 t (SD3's and
diffusers' ``timestep = sigma * num_train_timesteps``), so it sees the same range as a DDPM network's t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffusion.processes.base import MAX_SAMPLING_STEPS, ForwardProcess, per_image, randn
from diffusion.processes.schedules import check_continuous
from diffusion.processes.settings import check_flow

__all__ = ["FlowMatching", "FLOW_TIME_SCALE", "shift_time"]

#: the network's time input is FLOW_TIME_SCALE * t (diffusers' FlowMatchEulerDiscreteScheduler: num_train_timesteps)
FLOW_TIME_SCALE = 1000.0


def shift_time(t, shift: float):
    """t' = shift t / (1 + (shift - 1) t) (Esser et al. section 5.3.2; diffusers' ``shift``): 0 and 1 are fixed."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


class FlowMatching(ForwardProcess):
    """The rectified-flow path, its loss and its prior (the module docstring).

    Args:
        schedule: :class:`diffusion.processes.schedules.NoSchedule` (``schedule=none``, which process=flow selects).
        channels: image channels (unused).
        learn_sigma: must be false.
        objective: ``v`` (eps - x_0) | ``x0`` | ``eps``: what the network predicts.
        timestep_sampling: ``uniform`` | ``logit_normal`` (``logit_mean``, ``logit_std``) | ``mode`` (``mode_scale``).
        shift: the resolution shift of the training times and of the samplers' grids (1: none).
    """

    kind = "flow"
    time_name = "t"
    continuous_time = True

    def __init__(self, schedule=None, channels: int = 3, learn_sigma: bool = False, objective: str = "v",
                 timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, shift: float = 1.0):
        super().__init__()
        check_continuous("flow", schedule, learn_sigma)
        check_flow(objective, timestep_sampling, logit_mean, logit_std, mode_scale, shift)
        self.objective, self.timestep_sampling = objective, timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.mode_scale, self.shift = float(mode_scale), float(shift)

    @property
    def num_timesteps(self) -> int:
        return MAX_SAMPLING_STEPS

    # ----------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t in (0, 1) from ``timestep_sampling``, then shifted (float32, one per image)."""
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * randn((batch_size,), generator, device, torch.float32))
        else:
            on = generator.device if generator is not None else torch.device(device or "cpu")
            u = torch.rand((batch_size,), generator=generator, device=on, dtype=torch.float32).to(device or on)
            if self.timestep_sampling == "mode":  # Esser et al. eq. 20
                u = 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
            t = u
        return shift_time(t, self.shift)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps."""
        noise = torch.randn_like(x0) if noise is None else noise
        t = per_image(t.to(x0.dtype), x0)
        return (1 - t) * x0 + t * noise

    def network_time(self, t):
        """The network's time input: 1000 t."""
        return t * FLOW_TIME_SCALE

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example mean((network(x_t, 1000 t) - target)^2), the target eps - x_0 (v), x_0 or eps."""
        noise = torch.randn_like(x0) if noise is None else noise
        out = model(self.q_sample(x0, t, noise), self.network_time(t.float()))
        target = {"v": noise - x0, "x0": x0, "eps": noise}[self.objective]
        return F.mse_loss(out, target, reduction="none").flatten(1).mean(1)

    def time_bins(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Bin of t in n equal parts of [0, 1]."""
        return (t.float() * n).long().clamp(0, n - 1)

    # ----------------------------------------------------------------------------------------------- sampling
    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """v(x, t) from the network's output under the objective (x0: (x - x_0) / t; eps: (eps - x) / (1 - t))."""
        if self.objective == "v":
            return output
        if self.objective == "x0":  # (a call at t = 0 is never made: the samplers' last step is Euler's)
            return (x - output) / max(t, 1e-3)
        return (output - x) / max(1 - t, 1e-3)  # ill-posed at t = 1 (x_1 is eps itself): clamped there

    def x0_of(self, v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The predicted x_0 on the straight path: x - t v."""
        return x - t * v

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x_1 ~ N(0, I)."""
        return randn(shape, generator, device)

    def describe(self) -> str:
        return "(1 - t) x_0 + t eps"

    def figure_columns(self, columns: int) -> list[tuple[str, torch.Tensor | None]]:
        """t evenly spaced in [0, 1] (0: the image)."""
        times = torch.linspace(0, 1, columns, dtype=torch.float64).tolist()
        return [(f"t={t:.3g}", None if t == 0 else torch.tensor(t, dtype=torch.float32)) for t in times]
