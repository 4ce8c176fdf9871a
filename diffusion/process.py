"""The Gaussian forward process q and the reverse model p of Ho et al. (2020), with the names of the paper.

``GaussianDiffusion`` is an ``nn.Module`` only so that the schedule table lives in registered buffers: they move
with ``.to(device)``, are saved in every checkpoint and let a checkpoint be sampled without its config.

Timesteps are 0-based: ``t`` in ``0..T-1`` (see :mod:`diffusion.schedules`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.checks import check_choice
from diffusion.schedules import NoiseSchedule, ScheduleTable

VARIANCE_TYPES = ("fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "l1", "huber")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather ``a[t]`` per batch element and shape it to broadcast against ``x_shape``: (B, 1, 1, ...)."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class PMeanVariance(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


class GaussianDiffusion(nn.Module):
    """q(x_t | x_0), q(x_{t-1} | x_t, x_0), p(x_{t-1} | x_t) and the epsilon-prediction loss.

    Args:
        schedule: a :class:`NoiseSchedule` or an already computed :class:`ScheduleTable`.
        variance: the reverse-process variance, ``fixed_small`` (beta~_t, the true posterior's) or
            ``fixed_large`` (beta_t); Ho et al. found both give similar samples.
        loss_type: ``mse`` (L_simple, Ho et al. eq. 14), ``l1`` or ``huber`` on the noise prediction.
    """

    def __init__(
        self, schedule: NoiseSchedule | ScheduleTable, variance: str = "fixed_small", loss_type: str = "mse"
    ):
        super().__init__()
        table = schedule.table() if isinstance(schedule, NoiseSchedule) else schedule
        self.variance = check_choice("variance", variance, VARIANCE_TYPES)
        self.loss_type = check_choice("loss_type", loss_type, LOSS_TYPES)
        for name, value in table.as_dict().items():
            self.register_buffer(name, value.clone())
        # fixed_large uses beta_t, with beta~_1 at t = 0 so that log-variances stay finite (improved-diffusion).
        large = torch.cat([table.posterior_variance[1:2], table.betas[1:]]) if table.T > 1 else table.betas.clone()
        self.register_buffer("large_variance", large)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    # ----------------------------------------------------------------------------------------------- forward
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Ho et al. eq. 4)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
        var = extract(1.0 - self.alphas_cumprod, t, x0.shape)
        return mean, var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) by reparameterisation: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)   (Ho et al. eq. 6-7). Returns mean, variance, log-variance."""
        mean = extract(self.posterior_mean_coef1, t, xt.shape) * x0 + extract(self.posterior_mean_coef2, t, xt.shape) * xt
        var = extract(self.posterior_variance, t, xt.shape)
        log_var = extract(self.posterior_log_variance_clipped, t, xt.shape)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt.shape
        ) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt.shape
        )

    # ----------------------------------------------------------------------------------------------- reverse
    def p_mean_variance_from_eps(
        self,
        eps: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        variance: str | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t) given the model's noise prediction: the posterior at the predicted x_0.

        Its mean equals Ho et al. eq. 11, 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps), when the
        predicted x_0 is not clipped.
        """
        variance = self.variance if variance is None else check_choice("variance", variance, VARIANCE_TYPES)
        pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        if variance == "fixed_small":
            var = extract(self.posterior_variance, t, xt.shape)
            log_var = extract(self.posterior_log_variance_clipped, t, xt.shape)
        else:
            var = extract(self.large_variance, t, xt.shape)
            log_var = var.log()
        return PMeanVariance(mean, var.expand_as(xt), log_var.expand_as(xt), pred_x0, eps)

    def p_mean_variance(
        self, model: Model, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False, variance: str | None = None
    ) -> PMeanVariance:
        """Run the epsilon-prediction ``model(x_t, t)`` and return the reverse step's mean and variance."""
        return self.p_mean_variance_from_eps(model(xt, t), xt, t, clip_denoised=clip_denoised, variance=variance)

    # ----------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """t ~ Uniform{0, ..., T-1}."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example loss on the noise prediction (Ho et al. Algorithm 1), averaged over all but the batch dim."""
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps = model(xt, t)
        if eps.shape != noise.shape:
            raise ValueError(f"model output shape {tuple(eps.shape)} differs from its input shape {tuple(noise.shape)}")
        if self.loss_type == "mse":
            loss = F.mse_loss(eps, noise, reduction="none")
        elif self.loss_type == "l1":
            loss = F.l1_loss(eps, noise, reduction="none")
        else:
            loss = F.huber_loss(eps, noise, reduction="none", delta=1.0)
        return loss.flatten(1).mean(1)
