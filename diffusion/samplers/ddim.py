"""DDIM, Song et al. (2021): the non-Markovian reverse process on a sub-grid, deterministic at eta = 0."""

from __future__ import annotations

import math

from diffusion.checks import check_choice
from diffusion.processes.gaussian import GaussianDiffusion
from diffusion.samplers.base import (
    SPACING_CONTROL,
    SPACINGS,
    Control,
    Sampler,
    StepOutput,
    check_number,
    make_timesteps,
)


class DDIMSampler(Sampler):
    """Song et al. (2021) generalised reverse process on a sub-grid of ``num_steps`` timesteps.

    ``eta = 0`` is the deterministic DDIM; ``eta = 1`` with ``num_steps = T`` is DDPM with beta~ (eq. 16).
    Any objective (eps, x0, v) is turned into the predicted x_0 and eps; a learned variance is not used (sigma
    comes from eta), as in improved-diffusion's DDIM. The previous timestep of every step is the next entry of the
    grid, never ``t - T // num_steps`` (wrong under ``linspace``/``trailing`` spacings).
    """

    controls = (Control("eta", "eta: 0 deterministic (DDIM), 1 DDPM-like fresh noise every step", 0.0, 1.0, 0.05), SPACING_CONTROL)

    def __init__(self, process: GaussianDiffusion, num_steps: int | None = 50, eta: float = 0.0,
                 spacing: str = "leading", clip_denoised: bool = False):
        self.eta = check_number("eta", eta)
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def set_timesteps(self, num_steps: int) -> None:
        grid = make_timesteps(self.T, num_steps, self.spacing)
        abar = self.process.alphas_cumprod.detach().double().cpu().tolist()
        self._abar = [abar[t] for t in grid]
        self._abar_prev = self._abar[1:] + [1.0]  # alpha_bar of x_0 is 1 (diffusers' set_alpha_to_one)
        self._set_grid(num_steps, grid)

    def sigma2(self, i: int) -> float:
        """sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)     (Song et al. eq. 16)."""
        a_t, a_prev = self._abar[i], self._abar_prev[i]
        return self.eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        a_t, a_prev = self._abar[i], self._abar_prev[i]
        # "predicted x_0" = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                              (eq. 12, first term)
        pred_x0, eps = self.predict_x0_eps(model_output, x, math.sqrt(a_t), math.sqrt(1 - a_t))
        sigma2 = self.sigma2(i)
        # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z                 (eq. 12)
        x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1 - a_prev - sigma2, 0.0)) * eps
        if sigma2 > 0 and i < self.nfe - 1:
            x_prev = x_prev + math.sqrt(sigma2) * self.noise_like(x, generator)
        return StepOutput(x_prev, pred_x0)

    def describe(self) -> str:
        return f"{super().describe()}, eta {self.eta:g}"
