"""The Gaussian forward process q and the reverse model p of Ho et al. (2020), with the names of the paper.

``GaussianDiffusion`` is an ``nn.Module`` only so that the schedule table lives in registered buffers: they move
with ``.to(device)``, are saved in every checkpoint and let a checkpoint be sampled without its config.

Timesteps are 0-based: ``t`` in ``0..T-1`` (see :mod:`diffusion.schedules`).
"""

from __future__ import annotations

import math

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

    # ----------------------------------------------------------------------------------------------- VLB (NLL)
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits per dimension."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, var = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, var.log().expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_terms_bpd(
        self, eps: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> torch.Tensor:
        """One VLB term per example, in bits per dimension (Ho et al. eq. 5; 0-based t):

        t > 0: L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
        t = 0: L_0 = -log p(x_0 | x_1) under the discretised Gaussian decoder (Ho et al. eq. 13), x_0 in [-1, 1]
        on 256 levels.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance_from_eps(eps, xt, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_var.expand_as(true_mean), out.mean, out.log_variance)
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.inference_mode()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        num_timesteps: int | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The variational bound on -log p(x_0) in bits/dim: L_T + sum_t L_{t-1} + L_0 (Ho et al. eq. 5).

        ``num_timesteps=None`` evaluates every term (T model calls); ``K`` draws K distinct timesteps per batch and
        scales their sum by T / K, an unbiased Monte-Carlo estimate of the same bound. Returns per-example
        ``total_bpd``, ``prior_bpd``, ``vb_bpd`` (sum of the t-terms) and ``decoder_bpd`` (L_0, when evaluated),
        and ``terms`` (batch x evaluated timesteps) with ``timesteps``.
        """
        T = self.num_timesteps
        if num_timesteps is None or num_timesteps >= T:
            timesteps = torch.arange(T - 1, -1, -1)
        else:
            if num_timesteps < 1:
                raise ValueError(f"nll num_timesteps={num_timesteps} is invalid: it must be >= 1 (or null for all T)")
            timesteps = torch.randperm(T, generator=generator)[:num_timesteps].sort(descending=True).values
        terms = []
        for t in timesteps.tolist():
            t_b = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device).to(x0)
            xt = self.q_sample(x0, t_b, noise)
            terms.append(self.vb_terms_bpd(model(xt, t_b), x0, xt, t_b, clip_denoised=clip_denoised))
        terms = torch.stack(terms, dim=1)
        vb = terms.sum(1) * (T / len(timesteps))
        prior = self.prior_bpd(x0)
        out = {"total_bpd": vb + prior, "prior_bpd": prior, "vb_bpd": vb, "terms": terms, "timesteps": timesteps}
        if int(timesteps[-1]) == 0:
            out["decoder_bpd"] = terms[:, -1]
        return out


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x in [-1, 1] on 256 levels under N(means, exp(log_scales)^2) integrated over each bin of width
    2/255; the edge bins take the whole tails (Ho et al. eq. 13). Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_one_minus_cdf_lower, torch.log(cdf_delta.clamp(min=1e-12))),
    )
