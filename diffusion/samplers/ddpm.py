"""Ancestral sampling, Ho et al. (2020) Algorithm 2, on all T steps or on a sub-grid (improved-diffusion's respacing)."""

from __future__ import annotations

import torch

from diffusion.checks import check_choice
from diffusion.processes.gaussian import VARIANCE_TYPES, GaussianDiffusion
from diffusion.processes.schedules import compute_table
from diffusion.samplers.base import SPACING_CONTROL, SPACINGS, Sampler, StepOutput, make_timesteps


class DDPMSampler(Sampler):
    """x_{t-1} ~ p(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_t), the last step returning the mean (Algorithm 2).

    ``num_steps < T`` samples the respaced chain of Nichol & Dhariwal (2021, section 4): on the grid
    t_1 < ... < t_n the process with alpha_bar'_k = alpha_bar_{t_k}, i.e. beta'_k = 1 - alpha_bar_{t_k} /
    alpha_bar_{t_(k-1)}, whose posterior (and learned-range variance, between beta~'_k and beta'_k) replaces the
    full chain's; the network is still called at the original t_k. It is diffusers' ``DDPMScheduler`` with
    ``num_inference_steps``. ``variance``: ``fixed_small`` (beta~), ``fixed_large`` (beta) or ``learned_range``;
    ``None`` is the process's (the learned one for a network with ``learn_sigma``).
    """

    stochastic = True
    controls = (SPACING_CONTROL,)

    def __init__(self, process: GaussianDiffusion, num_steps: int | None = None, variance: str | None = None,
                 spacing: str = "leading", clip_denoised: bool = False):
        self.variance = None if variance is None else check_choice("sampler variance", variance, VARIANCE_TYPES)
        if self.variance == "learned_range" and not process.learned_variance:
            raise ValueError("sampler variance=learned_range is invalid: this network has no learned variance "
                             "(model.learn_sigma=false); use fixed_small or fixed_large")
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    def set_timesteps(self, num_steps: int) -> None:
        p = self.process
        grid = list(range(self.T - 1, -1, -1)) if num_steps == self.T else make_timesteps(self.T, num_steps, self.spacing)
        if num_steps == self.T:
            self._chain = p
        else:  # the respaced process on the ascending grid (improved-diffusion's SpacedDiffusion)
            abar = torch.cumprod(1 - p.betas.double().cpu(), 0)[torch.tensor(grid[::-1])]
            betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            self._chain = GaussianDiffusion(compute_table(betas), variance=p.variance, objective=p.objective,
                                            learn_sigma=p.learned_variance).to(p.betas.device)
        self._set_grid(num_steps, grid)

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        k = torch.full((x.shape[0],), self.nfe - 1 - i, dtype=torch.long, device=x.device)  # index in the chain
        if self._chain.betas.device != x.device:
            self._chain = self._chain.to(x.device)
        # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z     (Algorithm 2, line 4)
        out = self._chain.p_mean_variance_from_output(model_output, x, k, clip_denoised=self.clip_denoised,
                                                      variance=self.variance)
        if i == self.nfe - 1:  # z = 0 at the last step
            return StepOutput(out.mean, out.pred_x0)
        return StepOutput(out.mean + out.variance.sqrt() * self.noise_like(x, generator), out.pred_x0)
