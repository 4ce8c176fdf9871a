"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the variance-
exploding process x = x_0 + sigma eps with a preconditioned denoiser, a log-normal training distribution of sigma
and the loss weight that makes the effective target unit-variance at every sigma.

Table 1 ("Ours"), with sigma_data the data's standard deviation (0.5 for images in [-1, 1]):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))                    (eq. 7)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4
    ln sigma ~ N(P_mean, P_std^2) in training (P_mean = -1.2, P_std = 1.2)
    loss = lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2,  lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2  (eq. 8)

F is any network of this framework (``model=``): it sees c_in x and the float c_noise where a DDPM network sees
x_t and an integer t. Sampling integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (eq. 1 and
3, sigma(t) = t, s(t) = 1) on a grid between ``sigma_min`` and ``sigma_max`` from x = sigma_max z: the samplers of
:mod:`diffusion.samplers.karras` (Heun, Euler, DPM-Solver++ 2M), through the sigma interface below, which
:class:`diffusion.processes.gaussian.GaussianDiffusion` offers too (its alpha_bar table read as sigmas).
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.base import MAX_SAMPLING_STEPS, ForwardProcess, per_image, randn
from diffusion.processes.schedules import check_continuous
from diffusion.processes.settings import check_edm

__all__ = ["EDMProcess", "MAX_SAMPLING_STEPS"]

class EDMProcess(ForwardProcess):
    """The EDM process and its preconditioning (the module docstring's Table 1).

    Args:
        schedule: :class:`diffusion.processes.schedules.NoSchedule` (``schedule=none``, which process=edm selects).
        channels: image channels (unused: the prior is N(0, sigma_max^2 I) for any image).
        learn_sigma: must be false (the ODE needs no variance).
        sigma_data, P_mean, P_std: Table 1's; sigma_min, sigma_max: the sampling range (EDM: 0.002, 80).
    """

    kind = "edm"
    objective = "x0"  # what the sampler reads from the denoiser: D(x; sigma) estimates x_0
    timestep_sampling = "log_normal"
    time_name = "σ"  # sigma (labels: σ=80)
    continuous_time = True

    def __init__(self, schedule=None, channels: int = 3, learn_sigma: bool = False, sigma_data: float = 0.5,
                 P_mean: float = -1.2, P_std: float = 1.2, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        check_continuous("edm", schedule, learn_sigma)
        check_edm(sigma_data, P_mean, P_std, sigma_min, sigma_max)
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @property
    def num_timesteps(self) -> int:
        return MAX_SAMPLING_STEPS

    # ----------------------------------------------------------------------------------------------- Table 1
    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (a float or a tensor)."""
        sd = self.sigma_data
        if isinstance(sigma, torch.Tensor):
            root = (sigma**2 + sd**2).sqrt()
            return sd**2 / (sigma**2 + sd**2), sigma * sd / root, 1 / root, sigma.log() / 4
        root = math.sqrt(sigma**2 + sd**2)
        return sd**2 / (sigma**2 + sd**2), sigma * sd / root, 1 / root, math.log(sigma) / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (eq. 8 with Table 1's choice)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for one sigma per image (B,)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma.float())
        out = model(per_image(c_in, x) * x, c_noise)
        return per_image(c_skip, x) * x + per_image(c_out, x) * out

    # ----------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """sigma = exp(P_mean + P_std n), n ~ N(0, 1): the training noise levels (float32, one per image)."""
        n = randn((batch_size,), generator, device, torch.float32)
        return (self.P_mean + self.P_std * n).exp()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x = x_0 + sigma eps (``t`` is sigma, one per image)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return x0 + per_image(t.to(x0.dtype), x0) * noise

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example lambda(sigma) mean((D(x_0 + sigma eps; sigma) - x_0)^2) (EDM eq. 2 and 8; ``t`` is sigma)."""
        denoised = self.denoise(model, self.q_sample(x0, t, noise), t)
        return self.loss_weight(t.to(x0.dtype)) * (denoised - x0).square().flatten(1).mean(1)

    def time_bins(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The quantile bin of each training sigma under its log-normal law (each of the n bins equally likely)."""
        u = 0.5 * (1 + torch.erf((t.float().log() - self.P_mean) / (self.P_std * math.sqrt(2))))
        return (u * n).long().clamp(0, n - 1)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """z ~ N(0, I): the samplers start from sigma_0 z (``init_noise_sigma``), sigma_0 = sigma_max on their grids."""
        return randn(shape, generator, device)

    def describe(self) -> str:
        return "x_0 + sigma eps"

    def figure_columns(self, columns: int) -> list[tuple[str, torch.Tensor | None]]:
        """sigma = 0 (the image), then ``columns - 1`` sigmas log-spaced from sigma_min to sigma_max."""
        sigmas = torch.logspace(math.log10(self.sigma_min), math.log10(self.sigma_max), columns - 1, dtype=torch.float64)
        return [("σ=0", None)] + [(f"σ={s:.2g}", torch.tensor(s, dtype=torch.float32)) for s in sigmas.tolist()]

    def figure_state(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma eps shown as (x_0 + sigma eps) / sqrt(1 + sigma^2) (its variance-preserving equivalent), so that
        every column is in the image range."""
        return self.q_sample(x0, t.expand(len(x0)), noise) / math.sqrt(1 + float(t) ** 2)

    # the sigma interface of diffusion.samplers.karras (GaussianDiffusion has the same five methods)
    def sigma_table(self) -> list[float] | None:
        """None: no discrete sigmas (a sampler's ``sigmas=schedule`` grid is refused)."""
        return None

    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def sigma_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The network's input at state x of noise level sigma: c_in x."""
        return x * self.preconditioning(sigma)[2]

    def sigma_time(self, sigma: float) -> float:
        """The network's time input at sigma: c_noise = ln(sigma) / 4."""
        return self.preconditioning(sigma)[3]

    def sigma_denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F from the network's output F at c_in x."""
        c_skip, c_out, _, _ = self.preconditioning(sigma)
        return c_skip * x + c_out * output

    def sigma_prior_std(self, sigma: float) -> float:
        """The std of the first state at sigma (EDM Algorithm 1, line 2: x_0 ~ N(0, sigma_max^2 I))."""
        return sigma
