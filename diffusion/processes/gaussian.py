"""The Gaussian forward process q and the reverse model p of Ho et al. (2020), with the names of the paper.

``GaussianDiffusion`` is an ``nn.Module`` only so that the schedule table lives in registered buffers: they move
with ``.to(device)``, are saved in every checkpoint and let a checkpoint be sampled without its config.

Timesteps are 0-based: ``t`` in ``0..T-1`` (see :mod:`diffusion.processes.schedules`).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from diffusion.checks import check_choice
from diffusion.processes.base import ForwardProcess, randn
from diffusion.processes.objectives import OBJECTIVES, eps_from_x0, target_from_x0_eps, to_x0_eps
from diffusion.processes.schedules import NoiseSchedule, ScheduleTable
from diffusion.processes.timesteps import TIMESTEP_SAMPLINGS

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
#: the schedule table's entries this process reads (buffers: in every checkpoint, moved with the module)
BUFFERS = ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
#: table entries earlier versions kept as buffers although nothing read them: dropped from old checkpoints on load
RETIRED_BUFFERS = ("alphas", "alphas_cumprod_prev", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod")
LOSS_TYPES = ("mse", "l1", "huber", "hybrid", "vlb")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather ``a[t]`` per batch element and shape it to broadcast against ``x_shape``: (B, 1, 1, ...)."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def sigma_to_t(sigma: float, log_sigmas: list[float]) -> float:
    """The continuous timestep of ``sigma``: linear interpolation in log sigma between the schedule's (increasing)
    ``log_sigmas``, clamped to [0, T - 1] (diffusers' ``_sigma_to_t``; the inverse of
    ``GaussianDiffusion.alphas_cumprod_at`` for float t)."""
    if len(log_sigmas) == 1:
        return 0.0
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(bisect.bisect_right(log_sigmas, log_sigma) - 1, 0), len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return low + w


class PMeanVariance(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


class GaussianDiffusion(ForwardProcess):
    """q(x_t | x_0), q(x_{t-1} | x_t, x_0), p(x_{t-1} | x_t) and the training losses.

    Args:
        schedule: a :class:`NoiseSchedule` or an already computed :class:`ScheduleTable`.
        variance: the reverse-process variance, ``fixed_small`` (beta~_t, the true posterior's) or
            ``fixed_large`` (beta_t) -- Ho et al. found both give similar samples -- or ``learned_range``
            (Nichol & Dhariwal eq. 15): the network outputs 2C channels, the second C interpolating the
            log-variance between log beta~_t and log beta_t.
        loss_type: ``mse`` (L_simple, Ho et al. eq. 14), ``l1`` or ``huber`` on the prediction target, or
            ``hybrid`` (Nichol & Dhariwal eq. 16): L_simple + ``hybrid_lambda`` * L_vlb, the VLB term seeing the
            predicted mean through a stop-gradient so that it trains the variance only; or ``vlb``, the bound
            itself (T L_t per example, in bits/dim: Ho et al. eq. 5, Nichol & Dhariwal's L_vlb), which trains mean and
            variance; pair it with ``timestep_sampling=importance`` (:mod:`diffusion.processes.timesteps`).
        objective: what the network predicts: ``eps`` (the noise, Ho et al.), ``x0`` (the clean image) or ``v``
            (sqrt(abar) eps - sqrt(1 - abar) x_0, Salimans & Ho 2022).
        min_snr_gamma: if set, weight each example's loss by min(SNR_t, gamma) / SNR_t (eps), min(SNR_t, gamma)
            (x0) or min(SNR_t, gamma) / (SNR_t + 1) (v) -- Hang et al. 2023, "Min-SNR weighting"; 5 is theirs.
        hybrid_lambda: lambda of the hybrid loss (0.001 in Nichol & Dhariwal).
        timestep_sampling: how training draws t: ``uniform`` or ``importance`` (:mod:`diffusion.processes.timesteps`).
        channels: the images' channels (unused: every process takes it).
        learn_sigma: whether the network outputs a variance too (``model.learn_sigma``): true makes the variance
            ``learned_range``, false refuses ``learned_range``; None (library use): as ``variance`` says.
    """

    kind = "gaussian"

    def __init__(
        self,
        schedule: NoiseSchedule | ScheduleTable,
        variance: str = "fixed_small",
        loss_type: str = "mse",
        objective: str = "eps",
        min_snr_gamma: float | None = None,
        hybrid_lambda: float = 0.001,
        timestep_sampling: str = "uniform",
        channels: int | None = None,
        learn_sigma: bool | None = None,
    ):
        super().__init__()
        if not isinstance(schedule, (NoiseSchedule, ScheduleTable)):
            raise ValueError(f"process=gaussian needs a beta schedule (linear, cosine, ...), got {type(schedule).__name__}: "
                             "for schedule=blur use process=blur")
        if learn_sigma:
            variance = "learned_range"
        elif variance == "learned_range" and learn_sigma is not None:
            raise ValueError("process.variance=learned_range is invalid without model.learn_sigma=true (the network must output it)")
        self.timestep_sampling = check_choice("process.timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        table = schedule.table() if isinstance(schedule, NoiseSchedule) else schedule
        self.variance = check_choice("process.variance", variance, VARIANCE_TYPES)
        self.loss_type = check_choice("process.loss_type", loss_type, LOSS_TYPES)
        self.objective = check_choice("process.objective", objective, OBJECTIVES)
        if loss_type == "hybrid" and variance != "learned_range":
            raise ValueError("process.loss_type=hybrid is invalid with a fixed variance: it trains a learned one (model.learn_sigma=true)")
        if min_snr_gamma is not None and loss_type == "vlb":
            raise ValueError(f"process.min_snr_gamma={min_snr_gamma} is invalid with process.loss_type=vlb: it weights the simple loss")
        if min_snr_gamma is not None and (isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) or min_snr_gamma <= 0):
            raise ValueError(f"process.min_snr_gamma={min_snr_gamma!r} is invalid: it must be a number > 0 (or null for no weighting)")
        if isinstance(hybrid_lambda, bool) or not isinstance(hybrid_lambda, (int, float)) or hybrid_lambda < 0:
            raise ValueError(f"process.hybrid_lambda={hybrid_lambda!r} is invalid: it must be a number >= 0")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.hybrid_lambda = float(hybrid_lambda)
        for name in BUFFERS:
            self.register_buffer(name, getattr(table, name).clone())
        # fixed_large uses beta_t, with beta~_1 at t = 0 so that log-variances stay finite (improved-diffusion).
        large = torch.cat([table.posterior_variance[1:2], table.betas[1:]]) if table.T > 1 else table.betas.clone()
        self.register_buffer("large_variance", large)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in RETIRED_BUFFERS:  # checkpoints written before they were retired still load (strictly)
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

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

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return eps_from_x0(xt, x0, extract(self.sqrt_alphas_cumprod, t, xt.shape),
                           extract(self.sqrt_one_minus_alphas_cumprod, t, xt.shape))

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer or fractional timesteps (B,): a fractional t lies between the schedule's sigmas,
        sigma = sqrt((1 - alpha_bar) / alpha_bar), interpolated linearly in log sigma -- the inverse of the
        sigma -> t map of the Karras samplers (diffusers' ``_sigma_to_t``), so a network called at the t of a
        sigma is asked about that sigma. Integer t is a table lookup."""
        abar = self.alphas_cumprod
        if not t.is_floating_point():
            return abar.gather(0, t)
        log_sigmas = (0.5 * ((1 - abar.double()) / abar.double()).log())
        t = t.double().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 1)
        high = (low + 1).clamp(max=self.num_timesteps - 1)
        w = t - low
        log_sigma = (1 - w) * log_sigmas.gather(0, low) + w * log_sigmas.gather(0, high)
        return (1 / (1 + (2 * log_sigma).exp())).to(abar.dtype)

    # the sigma interface of diffusion.samplers.karras (EDMProcess has the same methods): the table read as the
    # variance-exploding process x = x_VP / sqrt(alpha_bar) = x_0 + sigma eps, sigma = sqrt((1 - alpha_bar) / alpha_bar)
    def sigma_table(self) -> list[float]:
        """sigma_t for t = 0..T-1 (increasing): the table's ``sqrt_recipm1_alphas_cumprod``, computed in float64 before
        its float32 rounding, like the coefficients the network was trained with (from the float32 alpha_bar,
        1 - alpha_bar at t = 0 keeps only 3-4 digits: sigma_min would be off by 1e-4, as in diffusers)."""
        return self.sqrt_recipm1_alphas_cumprod.detach().double().cpu().tolist()

    def sigma_range(self) -> tuple[float, float]:
        table = self.sigma_table()
        return table[0], table[-1]

    def sigma_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The VP state the network was trained on: x / sqrt(sigma^2 + 1)."""
        return x / math.sqrt(sigma * sigma + 1)

    def sigma_time(self, sigma: float) -> float:
        """The continuous timestep of sigma (:func:`sigma_to_t` on the table's log sigmas)."""
        key = self.sqrt_recipm1_alphas_cumprod.data_ptr()
        if getattr(self, "_log_sigmas_key", None) != key:
            self._log_sigmas, self._log_sigmas_key = [math.log(s) for s in self.sigma_table()], key
        return sigma_to_t(sigma, self._log_sigmas)

    def sigma_denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma): the predicted x_0 from the network's output at the VP input x / sqrt(sigma^2 + 1), where
        alpha = 1 / sqrt(1 + sigma^2) and sigma_VP = sigma / sqrt(1 + sigma^2) (any objective)."""
        c = math.sqrt(1 + sigma * sigma)
        prediction, _ = self.split_output(output, x / c)
        return to_x0_eps(self.objective, prediction, x / c, 1 / c, sigma / c)[0]

    def sigma_prior_std(self, sigma: float) -> float:
        """sqrt(sigma^2 + 1): the VP prior draw N(0, I) in the sigma state at sigma (x_VP / sqrt(alpha_bar))."""
        return math.sqrt(sigma * sigma + 1)

    # ----------------------------------------------------------------------------------------------- reverse
    def split_output(self, output: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the prediction, the variance values or None): a learned-variance network outputs 2C channels."""
        expected = 2 * xt.shape[1] if self.learned_variance else xt.shape[1]
        if output.shape[1] != expected or output.shape[2:] != xt.shape[2:]:
            what = "2 x the input channels (learned variance)" if self.learned_variance else "the input's shape"
            raise ValueError(f"model output shape {tuple(output.shape)} is invalid: expected {what}, input {tuple(xt.shape)}")
        return output.chunk(2, dim=1) if self.learned_variance else (output, None)

    def model_predictions(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """(pred_x0, pred_eps, variance values or None) from the network's output under this process's objective."""
        prediction, var_values = self.split_output(output, xt)
        sa = extract(self.sqrt_alphas_cumprod, t, xt.shape)
        s1m = extract(self.sqrt_one_minus_alphas_cumprod, t, xt.shape)
        pred_x0, eps = to_x0_eps(self.objective, prediction, xt, sa, s1m)  # the coefficients q_sample uses
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        return pred_x0, eps, var_values

    def learned_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 clamped to [0, 1]
        (Nichol & Dhariwal eq. 15; the clamp keeps Sigma inside [beta~_t, beta_t] whatever the network says).

        Both ends as in improved-diffusion's LEARNED_RANGE: min_log = posterior_log_variance_clipped[t] (beta~_1 at
        t = 0, where beta~ is 0) and max_log = log betas[t] at every t, t = 0 included -- not fixed_large's table,
        whose t = 0 entry is beta~_1 too and would leave the decoder's variance no range to learn.
        """
        min_log = extract(self.posterior_log_variance_clipped, t, var_values.shape)
        max_log = extract(self.betas.log(), t, var_values.shape)
        frac = ((var_values + 1) / 2).clamp(0.0, 1.0)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance_from_output(
        self,
        output: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        variance: str | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t) given the network's output: the posterior at the predicted x_0, with the fixed or the
        learned variance (``variance`` overrides the process's choice; a fixed one ignores a learned output).

        With the eps objective its mean equals Ho et al. eq. 11, 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 -
        alpha_bar_t) eps), when the predicted x_0 is not clipped.
        """
        variance = self.variance if variance is None else check_choice("variance", variance, VARIANCE_TYPES)
        pred_x0, eps, var_values = self.model_predictions(output, xt, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        if variance == "learned_range":
            if var_values is None:
                raise ValueError("variance='learned_range' needs a network with a learned variance (model.learn_sigma=true)")
            log_var = self.learned_log_variance(var_values, t)
            var = log_var.exp()
        elif variance == "fixed_small":
            var = extract(self.posterior_variance, t, xt.shape)
            log_var = extract(self.posterior_log_variance_clipped, t, xt.shape)
        else:
            var = extract(self.large_variance, t, xt.shape)
            log_var = var.log()
        return PMeanVariance(mean, var.expand_as(xt), log_var.expand_as(xt), pred_x0, eps)

    def p_mean_variance(
        self, model: Model, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False, variance: str | None = None
    ) -> PMeanVariance:
        """Run the network ``model(x_t, t)`` and return the reverse step's mean and variance."""
        return self.p_mean_variance_from_output(model(xt, t), xt, t, clip_denoised=clip_denoised, variance=variance)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t)."""
        abar = self.alphas_cumprod.gather(0, t)
        return abar / (1 - abar)

    def describe(self) -> str:
        return "q(x_t | x_0)"

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x_T ~ N(0, I), drawn on the generator's device and moved to ``device`` (default: the buffers')."""
        return randn(shape, generator, device if device is not None else self.betas.device)

    # ----------------------------------------------------------------------------------------------- training
    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for (x_0, eps, t) under the objective."""
        return target_from_x0_eps(self.objective, x0, noise, extract(self.sqrt_alphas_cumprod, t, x0.shape),
                                  extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for the objective; None without weighting."""
        if self.min_snr_gamma is None:
            return None
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.objective]

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example training loss (Ho et al. Algorithm 1 for eps and mse), averaged over all but the batch dim.

        ``hybrid`` adds ``hybrid_lambda * T * L_t`` (bits/dim): T L_t is the one-sample estimate of L_vlb =
        sum_t L_t, and the network's mean prediction is detached there, as in Nichol & Dhariwal section 3.1.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        output = model(xt, t)
        if self.loss_type == "vlb":  # T L_t: the one-sample estimate of the whole bound
            return self.num_timesteps * self.vb_terms_bpd(output, x0, xt, t)
        prediction, var_values = self.split_output(output, xt)
        target = self.training_target(x0, noise, t)
        if self.loss_type in ("mse", "hybrid"):
            loss = F.mse_loss(prediction, target, reduction="none")
        elif self.loss_type == "l1":
            loss = F.l1_loss(prediction, target, reduction="none")
        else:
            loss = F.huber_loss(prediction, target, reduction="none", delta=1.0)
        loss = loss.flatten(1).mean(1)
        weight = self.loss_weight(t)
        if weight is not None:
            loss = loss * weight
        if self.loss_type == "hybrid":
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            loss = loss + self.hybrid_lambda * self.num_timesteps * self.vb_terms_bpd(frozen, x0, xt, t)
        return loss

    # ----------------------------------------------------------------------------------------------- VLB (NLL)
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits per dimension."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, var = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, var.log().expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_terms_bpd(
        self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> torch.Tensor:
        """One VLB term per example from the network's output, in bits per dimension (Ho et al. eq. 5; 0-based t):

        t > 0: L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
        t = 0: L_0 = -log p(x_0 | x_1) under the discretised Gaussian decoder (Ho et al. eq. 13), x_0 in [-1, 1]
        on 256 levels.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance_from_output(output, xt, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_var.expand_as(true_mean), out.mean, out.log_variance)
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def middle_strata(self, num_terms: int) -> torch.Tensor:
        """The K + 1 boundaries 1 = b_0 < b_1 < ... < b_K = T of K contiguous strata [b_k, b_{k+1}) of the KL
        timesteps 1..T-1, equally spaced in log t (b_k = T^(k/K) rounded, each stratum at least one timestep).

        Small strata where the terms are large and change fast: the first few steps dominate the bound (Nichol &
        Dhariwal 2021, Fig. 2). On a trained model (tests/processes/test_nll.py) this gives a per-image standard deviation of
        the 10-term estimate about 20 times smaller than strata of equal size; any strata give an unbiased estimate.
        """
        T = self.num_timesteps
        if not 1 <= num_terms <= T - 1:
            raise ValueError(f"num_terms={num_terms} is invalid: K strata of the {T - 1} KL timesteps need 1 <= K <= {T - 1}")
        bounds = [1]
        for k in range(1, num_terms + 1):
            b = max(round(T ** (k / num_terms)), bounds[-1] + 1)  # geometric, at least one timestep per stratum
            bounds.append(min(b, T - (num_terms - k)))  # and room for one in each stratum after it
        return torch.tensor(bounds)

    @torch.inference_mode()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        num_timesteps: int | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The variational bound on -log p(x_0) in bits/dim per image: L_T + sum_{t=1}^{T-1} L_t + L_0 (Ho et al.
        eq. 5, 0-based t: L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), L_0 the decoder).

        ``num_timesteps=None`` (or K >= T - 1) evaluates every term: T model calls per batch. ``K`` < T - 1 computes
        the prior L_T (closed form) and the decoder L_0 (one model call) exactly and estimates the middle sum by
        stratified sampling: 1..T-1 is split into K contiguous strata S_k (:meth:`middle_strata`), every image
        draws its own t_k uniformly in each S_k, independently of the other images, and the sum is estimated by
        sum_k |S_k| L_{t_k}, unbiased since E[L_{t_k}] is the mean of L_t over S_k. That is K + 1 model calls per
        batch (K middle terms and the decoder; each call takes a per-image t). With timesteps (and noise) drawn
        independently per image, the per-image totals are independent unbiased estimates of each image's bound, so
        the standard error of their mean over the images includes the timestep sampling as well as the spread of
        the images. (Timesteps shared by a batch would correlate its images' estimates, and the naive standard
        error would understate the error.)

        Returns per-image ``total_bpd``, ``prior_bpd``, ``vb_bpd`` (the estimate of sum_{t<T} L_t, L_0 included)
        and ``decoder_bpd`` (L_0); ``terms`` (images x evaluated terms, decreasing t, L_0 last), ``timesteps``
        (their t: a vector of T-1..0 when exact, images x (K + 1) when estimated) and ``weights`` (the stratum
        sizes each column counts for, 1 for L_0), so that ``vb_bpd = (terms * weights).sum(1)``.
        """
        T, B = self.num_timesteps, x0.shape[0]
        if num_timesteps is not None and (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1):
            raise ValueError(f"nll num_timesteps={num_timesteps!r} is invalid: it must be an integer >= 1 (K middle terms; "
                             "null or K >= T - 1 for all T terms)")
        if num_timesteps is None or num_timesteps >= T - 1:
            timesteps = torch.arange(T - 1, -1, -1)
            per_image = timesteps.to(x0.device).expand(B, T)
            weights = torch.ones(T, dtype=torch.float64)
        else:
            bounds = self.middle_strata(num_timesteps)
            sizes = bounds.diff()
            u = torch.rand((B, num_timesteps), generator=generator, dtype=torch.float64,
                           device=generator.device if generator is not None else None)
            offsets = torch.minimum((u.cpu() * sizes).long(), sizes - 1)  # uniform in 0..|S_k|-1
            timesteps = torch.cat([torch.zeros(B, 1, dtype=torch.long), bounds[:-1] + offsets], 1).flip(1)  # L_0 last
            per_image = timesteps.to(x0.device)
            weights = torch.cat([torch.ones(1, dtype=torch.long), sizes]).flip(0).to(torch.float64)
        terms = []
        for column in per_image.unbind(1):
            column = column.contiguous()
            noise = randn(x0.shape, generator, x0.device).to(x0)
            xt = self.q_sample(x0, column, noise)
            terms.append(self.vb_terms_bpd(model(xt, column), x0, xt, column, clip_denoised=clip_denoised))
        terms = torch.stack(terms, dim=1)
        vb = (terms.double() * weights.to(x0.device)).sum(1).to(terms.dtype)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb + prior, "prior_bpd": prior, "vb_bpd": vb, "decoder_bpd": terms[:, -1], "terms": terms,
                "timesteps": timesteps, "weights": weights}


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_bin_probability(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, the standard normal's mass on [lower, upper], without the
    cancellation of the plain difference (which in float32 is 0 once the bin lies ~5.5 sigma out, in float64 ~8.3).

    By the symmetry Phi(u) - Phi(l) = Phi(-l) - Phi(-u), a bin with l > 0 is reflected onto the negative side, where
    Phi is small and known to full relative precision in log space (``log_ndtr``); then
    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), with log(1 - e^d) = log(-expm1(d)).
    """
    reflect = lower > 0
    a = torch.where(reflect, -upper, lower)
    b = torch.where(reflect, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x in [-1, 1] on 256 levels under N(means, exp(log_scales)^2) integrated over each bin of width
    2/255; the edge bins take the whole tails (Ho et al. eq. 13). Elementwise, in nats, in the inputs' dtype.

    Computed in float64 (float32 where the device has none, MPS) and in log space: the middle bins through
    :func:`log_normal_bin_probability`, the edge bins as log Phi(upper) and log Phi(-lower). So a mean many sigma
    from its pixel gets its true (large) negative log-likelihood, not a floor: the float32 Phi(u) - Phi(l) floored
    at 1e-12 of Ho et al.'s and improved-diffusion's code reads 27.6 nats for every pixel beyond ~5.5 sigma.
    """
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, means.dtype), log_scales.dtype)
    work = torch.float32 if x.device.type == "mps" else torch.float64
    x, means, log_scales = x.to(work), means.to(work), log_scales.to(work)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_probs = torch.where(
        x < -0.999,
        torch.special.log_ndtr(upper),  # the bin (-inf, -1 + 1/255]
        torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_normal_bin_probability(lower, upper)),
    )
    return log_probs.to(out_dtype)
