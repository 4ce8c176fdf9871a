"""Cold diffusion with Gaussian blur (Bansal et al. 2022): a deterministic forward process that blurs instead of
adding noise, a network trained to restore x_0, and a prior on the fully blurred x_T to generate from.

The paper applies ``s`` Gaussian kernels in turn, D(x_0, s) = G_s * ... * G_1 * x_0. Gaussian kernels compose by
adding variances, so D(x_0, s) is one Gaussian blur of width sigma_s = sqrt(sum_{i <= s} std_i^2). It is computed
exactly (no truncated kernel) in the DCT-II basis, where a Gaussian blur with mirrored borders is diagonal: the
coefficient of frequency w = pi k / N is multiplied by exp(-sigma^2 w^2 / 2) (the heat equation with Neumann
borders, as in Rissanen et al. 2023). D(x, 0) = x, every coefficient shrinks monotonically with s, and the image
mean is kept exactly. The last step averages completely (sigma_T = inf, the "discrete" generation setting of the
paper's code), so x_T is exactly the constant image of x_0's channel means, whatever the image size, and the prior
that generation starts from matches what the network saw in training.

Indexing follows :mod:`diffusion.processes.schedules`: the network's 0-based timestep ``t`` is the paper's step
``s = t + 1``, so ``q_sample(x_0, t) = D(x_0, t + 1)`` and ``blur(x, 0)`` is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffusion.checks import check_choice
from diffusion.processes.base import ForwardProcess, randn
from diffusion.processes.timesteps import TIMESTEP_SAMPLINGS

BLUR_ROUTINES = ("incremental", "constant", "exponential")
BLUR_LOSS_TYPES = ("l1", "mse")

__all__ = ["BlurSchedule", "BlurDiffusion", "dct_blur", "BLUR_ROUTINES"]


class BlurSchedule:
    """The per-step kernel widths of cold diffusion's Gaussian blur (the routines of the paper's code).

    Args:
        T: number of blur steps.
        kernel_std: std (pixels) of the step kernels: ``incremental`` std_s = kernel_std * s (the paper's default,
            0.1), ``constant`` std_s = kernel_std, ``exponential`` std_s = exp(kernel_std * (s - 1)).
        routine: one of :data:`BLUR_ROUTINES`.
    """

    def __init__(self, T: int = 50, kernel_std: float = 0.1, routine: str = "incremental"):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"schedule T={T!r} is invalid: the number of blur steps must be an integer >= 1")
        if isinstance(kernel_std, bool) or not isinstance(kernel_std, (int, float)) or kernel_std <= 0:
            raise ValueError(f"schedule kernel_std={kernel_std!r} is invalid: it must be a number > 0 (pixels)")
        self.T = T
        self.kernel_std = float(kernel_std)
        self.routine = check_choice("schedule routine", routine, BLUR_ROUTINES)

    def step_stds(self) -> torch.Tensor:
        """std_s of the kernel applied at step s = 1..T (float64, length T)."""
        s = torch.arange(1, self.T + 1, dtype=torch.float64)
        if self.routine == "incremental":
            return self.kernel_std * s
        if self.routine == "constant":
            return torch.full_like(s, self.kernel_std)
        return torch.exp(self.kernel_std * (s - 1))

    def sigmas(self) -> torch.Tensor:
        """Width of D(., s) for s = 0..T (float64, length T + 1): 0, then sqrt of the running sum of std_s^2, and
        inf at s = T (the complete average)."""
        widths = self.step_stds().square().cumsum(0).sqrt()
        widths[-1] = math.inf
        return torch.cat([torch.zeros(1, dtype=torch.float64), widths])


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (n x n): C[k, j] = a_k cos(pi (2j + 1) k / 2n), C^T C = I."""
    j = torch.arange(n, dtype=torch.float64)
    k = j[:, None]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


def _blur_matrices(n: int, sigma: torch.Tensor) -> torch.Tensor:
    """(B, n, n) matrices C^T diag(exp(-sigma^2 w_k^2 / 2)) C that blur one axis of length n, one per sigma."""
    c = dct_matrix(n, torch.float64, sigma.device)
    w = math.pi * torch.arange(n, dtype=torch.float64, device=sigma.device) / n
    gain = torch.exp(-0.5 * sigma.double()[:, None] ** 2 * w**2).nan_to_num(1.0)  # (B, n); inf * 0 at w = 0: the mean
    return torch.einsum("kj,bk,kl->bjl", c, gain, c)


def _apply(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows (B, H, H) @ x (B, C, H, W) @ cols (B, W, W)^T: a separable linear filter per image (or one filter for
    all images: rows (H, H), cols (W, W))."""
    spec = "bij,bcjk,blk->bcil" if rows.dim() == 3 else "ij,bcjk,lk->bcil"
    return torch.einsum(spec, rows.to(x.dtype), x, cols.to(x.dtype))


def dct_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Gaussian blur of ``x`` (B, C, H, W) with width ``sigma`` (pixels; a float or one per image) and mirrored
    (half-sample symmetric) borders, computed exactly in the DCT basis. ``sigma = 0`` is the identity."""
    b, _, h, w = x.shape
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(b)
    rows = _blur_matrices(h, sigma)
    return _apply(x, rows, rows if w == h else _blur_matrices(w, sigma))


class BlurDiffusion(ForwardProcess):
    """The Gaussian-blur forward process, its restoration loss and its prior (the same interface as
    :class:`diffusion.processes.base.ForwardProcess`: ``q_sample``, ``training_losses``,
    ``sample_timesteps``, ``sample_prior``).

    Args:
        schedule: a :class:`BlurSchedule`.
        channels: image channels (sizes the prior's statistics).
        loss_type: ``l1`` (the paper's) or ``mse`` between the restored and the clean image.
        learn_sigma: must be false (the process is deterministic: there is no variance to learn).
        timestep_sampling: how training draws t: ``uniform`` or ``importance`` (:mod:`diffusion.processes.timesteps`).

    The prior of x_T is the one-component case of the paper's Gaussian mixture on channel means: a Gaussian with the
    mean and covariance of the channel means of the training images (which blurring keeps), accumulated from every
    batch the process trains on (``training_losses`` in training mode) and saved with the checkpoint.
    """

    kind = "blur"
    objective = "x0"

    def __init__(self, schedule: BlurSchedule, channels: int, loss_type: str = "l1", learn_sigma: bool = False,
                 timestep_sampling: str = "uniform"):
        super().__init__()
        self.timestep_sampling = check_choice("process.timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        if not isinstance(schedule, BlurSchedule):
            raise ValueError(f"process=blur needs schedule=blur (a BlurSchedule), got {type(schedule).__name__}")
        if learn_sigma:
            raise ValueError("model.learn_sigma=true is invalid for process=blur: it is deterministic (leave it at false)")
        self.loss_type = check_choice("loss_type (process=blur)", loss_type, BLUR_LOSS_TYPES)
        # A plain tensor, not a buffer: the EMA of the weights also averages buffers, and lerp(inf, inf) is nan. The
        # widths follow from the schedule, which the checkpoint's hyper-parameters rebuild.
        self.blur_sigmas = schedule.sigmas()
        # running averages, not sums: they settle, so the EMA of the weights (which also averages buffers) keeps them
        self.register_buffer("prior_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("prior_mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("prior_second_moment", torch.zeros(channels, channels, dtype=torch.float64))
        self._operators: dict = {}  # (side, device, dtype) -> (T + 1, side, side) blur matrices, built on first use

    @property
    def num_timesteps(self) -> int:
        return int(self.blur_sigmas.shape[0]) - 1

    # ----------------------------------------------------------------------------------------------- forward
    def blur(self, x: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
        """D(x, s), the paper's degradation after ``s`` steps (s in 0..T, one per image or one for all); D(x, 0) = x.
        The T + 1 matrices per image side are built once (float64, then cast) and gathered per image."""
        h, w = x.shape[2:]
        return _apply(x, self._operator(h, x)[s], self._operator(w, x)[s])

    def _operator(self, side: int, x: torch.Tensor) -> torch.Tensor:
        key = (side, x.device, x.dtype)
        if key not in self._operators:
            self._operators[key] = _blur_matrices(side, self.blur_sigmas.to(x.device)).to(x.dtype)  # (T + 1, side, side)
        return self._operators[key]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = D(x_0, t + 1) for the 0-based timestep t (deterministic: ``noise`` is ignored)."""
        return self.blur(x0, t + 1)

    # ----------------------------------------------------------------------------------------------- training
    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example ||R(D(x_0, t+1), t) - x_0|| (the paper's eq. 1, L1 by default); also updates the prior."""
        if self.training:
            self.observe(x0)
        restored = model(self.q_sample(x0, t), t)
        loss = F.l1_loss if self.loss_type == "l1" else F.mse_loss
        return loss(restored, x0, reduction="none").flatten(1).mean(1)

    # ----------------------------------------------------------------------------------------------- prior
    @torch.no_grad()
    def observe(self, x0: torch.Tensor) -> None:
        """Fold a batch's channel means into the prior's running mean and second moment."""
        m = x0.double().mean(dim=(2, 3))  # (B, C)
        self.prior_count += m.shape[0]
        w = m.shape[0] / self.prior_count
        self.prior_mean.lerp_(m.mean(0), w)
        self.prior_second_moment.lerp_(m.T @ m / m.shape[0], w)

    def prior_mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (C) and covariance (C x C) of the training images' channel means."""
        n = float(self.prior_count)
        if n < 2:
            raise ValueError("the blur prior has seen fewer than 2 training images: train the model before sampling")
        mean = self.prior_mean
        cov = (self.prior_second_moment - torch.outer(mean, mean)) * (n / (n - 1))
        return mean, cov

    def describe(self) -> str:
        return "D(x_0, t)"

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x_T: constant images whose channel means are drawn from the fitted Gaussian (the sampler may perturb them)."""
        mean, cov = self.prior_mean_cov()
        eye = torch.eye(len(mean), dtype=torch.float64)
        chol = torch.linalg.cholesky(cov.cpu() + 1e-8 * eye)
        z = randn((shape[0], len(mean)), generator, self.prior_mean.device, torch.float64).cpu()
        colours = (mean.cpu() + z @ chol.T).float()[:, :, None, None].expand(shape)
        return colours.to(device if device is not None else self.prior_mean.device).contiguous()
