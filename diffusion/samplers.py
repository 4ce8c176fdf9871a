"""Reverse-process samplers behind one small interface, in the spirit of diffusers' schedulers.

    sampler = DDIMSampler(process, num_steps=50, eta=0.0)
    sampler.set_timesteps(100)                      # optional: change the grid
    for t in sampler.timesteps:                     # descending, 0-based model timesteps
        eps = model(x, torch.full((B,), t))
        x = sampler.step(eps, t, x, generator).prev_sample
    # or all at once, optionally keeping the trajectory for figures:
    out = sampler.sample(model, (16, 1, 32, 32), generator=g, return_trajectory=True)

The previous timestep of every step is read from the timestep grid itself (``prev_timesteps``), never
recomputed as ``t - T // num_steps`` -- that arithmetic is wrong under ``linspace``/``trailing`` spacings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffusion.blur import BlurDiffusion
from diffusion.checks import check_choice
from diffusion.process import VARIANCE_TYPES, GaussianDiffusion, Model, randn, to_x0_eps

SPACINGS = ("leading", "trailing", "linspace", "quadratic")

__all__ = ["Sampler", "DDPMSampler", "DDIMSampler", "ColdSampler", "StepOutput", "SampleOutput", "make_timesteps", "SPACINGS"]


def _check_num_steps(num_steps, T: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"sampler num_steps={num_steps!r} is invalid: it must be an integer in [1, T={T}]")
    return num_steps


def make_timesteps(T: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """A strictly decreasing grid of ``num_steps`` 0-based timesteps in [0, T-1].

    - ``leading``  (DDIM paper's uniform skip, diffusers' default): ``[0, k, 2k, ...]`` reversed, k = T // num_steps;
    - ``trailing`` (Lin et al. 2023): ``round(T - i T / num_steps) - 1``, always starts at T-1;
    - ``linspace``: ``round(linspace(0, T-1, num_steps))`` reversed, both ends included;
    - ``quadratic`` (DDIM paper, CIFAR10): ``int(linspace(0, sqrt(0.8 T), num_steps)^2)`` reversed, with repeated
      small values bumped up by one (the paper's code repeats t = 0).
    """
    check_choice("sampler spacing", spacing, SPACINGS)
    _check_num_steps(num_steps, T)
    n = num_steps
    if spacing == "leading":
        grid = [i * (T // n) for i in range(n)]
    elif spacing == "trailing":
        grid = [round(T * (n - i) / n) - 1 for i in range(n)][::-1]
    elif spacing == "linspace":
        grid = [T - 1] if n == 1 else [round(i * (T - 1) / (n - 1)) for i in range(n)]
    else:
        top = math.sqrt(0.8 * T)
        grid = [int((i * top / (n - 1)) ** 2) if n > 1 else int(top**2) for i in range(n)]
        for i in range(1, n):  # the squares crowd near 0 (0, 0, 1, 3, ...): keep the grid strictly increasing
            grid[i] = max(grid[i], grid[i - 1] + 1)
        if grid[-1] > T - 1:
            grid = []  # more steps than the quadratic grid can hold
    if len(set(grid)) != n:
        raise ValueError(
            f"sampler spacing={spacing!r} with num_steps={n} repeats timesteps for T={T}: "
            "use fewer steps or spacing=linspace"
        )
    return sorted(grid, reverse=True)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


class SampleOutput(NamedTuple):
    samples: torch.Tensor
    #: (num_steps + 1, B, C, H, W) on the CPU: x_T, then every x after a step (or the trajectory_points kept);
    #: None unless asked for.
    trajectory: torch.Tensor | None = None
    #: (num_steps, B, C, H, W) on the CPU: the predicted x_0 at every step (or at the kept ones); None unless asked for.
    pred_x0: torch.Tensor | None = None


class Sampler:
    """Common loop; subclasses define :meth:`set_timesteps` and :meth:`step_mean_variance` (or :meth:`step`)."""

    #: the forward process this sampler reverses (``process=gaussian`` or ``process=blur``)
    process_type: type = GaussianDiffusion
    process_name = "gaussian"

    def __init__(self, process, num_steps: int | None = None, clip_denoised: bool = False):
        if not isinstance(process, self.process_type):
            other = "sampler=cold" if isinstance(process, BlurDiffusion) else "sampler=ddpm or sampler=ddim"
            raise ValueError(f"sampler {type(self).__name__} is invalid for this model's forward process "
                             f"({type(process).__name__}): it reverses process={self.process_name}; use {other}")
        self.process = process
        self.clip_denoised = bool(clip_denoised)
        self.timesteps: list[int] = []
        self.prev_timesteps: dict[int, int] = {}
        self._t_batch: torch.Tensor | None = None  # reused timestep tensor: no allocation per step
        self.set_timesteps(self.T if num_steps is None else num_steps)

    @property
    def T(self) -> int:
        return self.process.num_timesteps

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def _set_grid(self, grid: list[int]) -> None:
        self.timesteps = list(grid)
        # -1 stands for "x_0": alpha_bar_{-1} = 1 (diffusers' set_alpha_to_one).
        self.prev_timesteps = {t: (grid[i + 1] if i + 1 < len(grid) else -1) for i, t in enumerate(grid)}

    def set_timesteps(self, num_steps: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _timestep_tensor(self, t: int, x: torch.Tensor) -> torch.Tensor:
        buf = self._t_batch
        if buf is None or buf.shape[0] != x.shape[0] or buf.device != x.device:
            buf = self._t_batch = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        return buf.fill_(t)

    def step_mean_variance(
        self, model_output: torch.Tensor, t: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor]:
        """Mean and variance of x_{prev(t)} given x_t and the model's noise prediction, and the predicted x_0."""
        raise NotImplementedError  # pragma: no cover - abstract

    def step(
        self, model_output: torch.Tensor, t: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> StepOutput:
        """One reverse step from timestep ``t`` (an element of :attr:`timesteps`) to ``prev_timesteps[t]``."""
        t = int(t)
        if t not in self.prev_timesteps:
            raise ValueError(f"timestep {t} is not on this sampler's grid; call set_timesteps first")
        mean, var, pred_x0 = self.step_mean_variance(model_output, t, x)  # model_output: the network's, any objective
        if self.prev_timesteps[t] < 0:  # the last step returns the mean (Algorithm 2: z = 0 when t = 1)
            return StepOutput(mean, pred_x0)
        std = var.sqrt() if isinstance(var, torch.Tensor) else math.sqrt(var)
        return StepOutput(mean + std * randn(x.shape, generator, x.device, x.dtype), pred_x0)

    def trajectory_indices(self, points: int | None = None) -> set[int]:
        """Which states of the chain a trajectory keeps: 0 is x_T, i the state after step i (all, or ``points``
        evenly spaced ones, both ends included)."""
        n = self.num_steps
        if points is None:
            return set(range(n + 1))
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(f"trajectory_points={points!r} is invalid: it must be an integer >= 2 (x_T and x_0)")
        return set(torch.linspace(0, n, min(points, n + 1)).round().long().tolist())

    @torch.inference_mode()
    def sample(
        self,
        model: Model,
        shape: tuple[int, ...] | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        trajectory_points: int | None = None,
    ) -> SampleOutput:
        """Run the whole reverse chain from x_T drawn from the process's prior (or ``noise``) and return x_0.

        ``return_trajectory`` keeps x after every step (and the predicted x_0 of each step); ``trajectory_points=K``
        keeps only K evenly spaced points of the chain, x_T and x_0 included, so long chains of many images fit.
        """
        if noise is None:
            if shape is None:
                raise ValueError("sample() needs a shape or an initial noise tensor")
            x = self.process.sample_prior(shape, generator, device)
        else:
            x = noise if device is None else noise.to(device)
        trajectory, preds = ([x.cpu()], []) if return_trajectory else (None, None)
        keep = self.trajectory_indices(trajectory_points) if return_trajectory else ()
        steps = self.timesteps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{type(self).__name__} sampling", leave=False)
        for i, t in enumerate(steps, start=1):
            out = model(x, self._timestep_tensor(t, x))
            x, pred_x0 = self.step(out, t, x, generator)
            if return_trajectory and i in keep:
                trajectory.append(x.cpu())
                preds.append(pred_x0.cpu())
        if return_trajectory:
            return SampleOutput(x, torch.stack(trajectory), torch.stack(preds))
        return SampleOutput(x)


class DDPMSampler(Sampler):
    """Ancestral sampling, Ho et al. (2020) Algorithm 2, over all T steps.

    ``variance`` is ``fixed_small`` (beta~_t), ``fixed_large`` (beta_t) or ``learned_range`` (the network's, Nichol &
    Dhariwal); ``None`` uses the process's setting, which is the learned one for a network with ``learn_sigma``.
    For fewer steps use :class:`DDIMSampler`: with ``eta=1`` it is this sampler on a sub-grid.
    """

    def __init__(
        self,
        process: GaussianDiffusion,
        num_steps: int | None = None,
        variance: str | None = None,
        clip_denoised: bool = False,
    ):
        self.variance = None if variance is None else check_choice("sampler variance", variance, VARIANCE_TYPES)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    def set_timesteps(self, num_steps: int) -> None:
        _check_num_steps(num_steps, self.T)
        if num_steps != self.T:
            raise ValueError(
                f"sampler num_steps={num_steps} is invalid for DDPM: ancestral sampling runs all T={self.T} steps; "
                "for fewer steps use sampler=ddim (eta=1 is DDPM on a sub-grid)"
            )
        self._set_grid(list(range(self.T - 1, -1, -1)))

    def step_mean_variance(self, model_output, t, x):
        # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z     (Algorithm 2, line 4)
        out = self.process.p_mean_variance_from_output(
            model_output, x, self._timestep_tensor(t, x), clip_denoised=self.clip_denoised, variance=self.variance
        )
        return out.mean, out.variance, out.pred_x0


class DDIMSampler(Sampler):
    """Song et al. (2021) generalised reverse process on a sub-grid of ``num_steps`` timesteps.

    ``eta = 0`` is the deterministic DDIM; ``eta = 1`` with ``num_steps = T`` is DDPM with beta~ (eq. 16).
    Any objective (eps, x0, v) is turned into the predicted x_0 and eps; a learned variance is not used (sigma
    comes from eta), as in improved-diffusion's DDIM.
    """

    def __init__(
        self,
        process: GaussianDiffusion,
        num_steps: int | None = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        clip_denoised: bool = False,
    ):
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise ValueError(f"sampler eta={eta!r} is invalid: it must be a number >= 0 (0 = deterministic DDIM)")
        self.eta = float(eta)
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    def set_timesteps(self, num_steps: int) -> None:
        self._set_grid(make_timesteps(self.T, num_steps, self.spacing))
        abar = self.process.alphas_cumprod.detach().double().cpu().tolist()
        self._abar = {t: abar[t] for t in self.timesteps}
        self._abar_prev = {t: (abar[p] if p >= 0 else 1.0) for t, p in self.prev_timesteps.items()}

    def sigma2(self, t: int) -> float:
        """sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)     (Song et al. eq. 16)."""
        a_t, a_prev = self._abar[t], self._abar_prev[t]
        return self.eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    def step_mean_variance(self, model_output, t, x):
        a_t, a_prev = self._abar[t], self._abar_prev[t]
        prediction, _ = self.process.split_output(model_output, x)
        # "predicted x_0" = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                              (eq. 12, first term)
        pred_x0, eps = to_x0_eps(self.process.objective, prediction, x, math.sqrt(a_t), math.sqrt(1 - a_t))
        if self.clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(a_t) * pred_x0) / math.sqrt(1 - a_t)
        sigma2 = self.sigma2(t)
        # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z                 (eq. 12)
        mean = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1 - a_prev - sigma2, 0.0)) * eps
        return mean, sigma2, pred_x0


class ColdSampler(Sampler):
    """Cold-diffusion sampling of the blur process (Bansal et al. 2022) on a grid of ``num_steps`` timesteps.

    At each step the network restores x^_0 = R(x_s, s); then (``improved``, the paper's Algorithm 2)
    x_{s'} = x_s - D(x^_0, s) + D(x^_0, s'), or (Algorithm 1) x_{s'} = D(x^_0, s'), where s' is the next, lower
    point of the grid (the paper uses every step: s' = s - 1). Algorithm 2 is exact for any restorer whose error
    the degradation does not see at first order: with a perfect restorer both return x_0, but a restorer off by a
    constant image c (which blurring keeps) still lands on x_0 with Algorithm 2 and on x_0 + c with Algorithm 1.

    The fully blurred x_T is a constant image, so colour alone would pick the sample. As in the paper's code, x_T
    is perturbed by white noise of std ``prior_noise_std``; Algorithm 2 carries that perturbation unchanged through
    every step (each step only adds D(x^_0, s') - D(x^_0, s)), and it is subtracted from the result
    (``remove_prior_noise``), so it steers the restorations without staying in the image. Otherwise deterministic.
    """

    process_type = BlurDiffusion
    process_name = "blur"

    def __init__(
        self,
        process: BlurDiffusion,
        num_steps: int | None = None,
        improved: bool = True,
        spacing: str = "linspace",
        clip_denoised: bool = True,
        prior_noise_std: float = 0.02,
        remove_prior_noise: bool = True,
    ):
        if isinstance(prior_noise_std, bool) or not isinstance(prior_noise_std, (int, float)) or prior_noise_std < 0:
            raise ValueError(f"sampler prior_noise_std={prior_noise_std!r} is invalid: it must be a number >= 0")
        self.prior_noise_std = float(prior_noise_std)
        self.remove_prior_noise = bool(remove_prior_noise)
        self.improved = bool(improved)
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    def set_timesteps(self, num_steps: int) -> None:
        self._set_grid(make_timesteps(self.T, num_steps, self.spacing))

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        t = int(t)
        if t not in self.prev_timesteps:
            raise ValueError(f"timestep {t} is not on this sampler's grid; call set_timesteps first")
        pred_x0 = model_output.clamp(-1.0, 1.0) if self.clip_denoised else model_output
        # the network's 0-based timestep t is the paper's step s = t + 1; the previous grid point p is s' = p + 1
        s, s_prev = t + 1, self.prev_timesteps[t] + 1
        target = self.process.blur(pred_x0, s_prev)
        if self.improved:
            target = x - self.process.blur(pred_x0, s) + target  # Algorithm 2, line 3
        return StepOutput(target, pred_x0)

    @torch.inference_mode()
    def sample(self, model, shape=None, *, noise=None, generator=None, device=None, return_trajectory=False, progress=False,
               trajectory_points=None):
        """As :meth:`Sampler.sample`; without ``noise``, x_T = prior + ``prior_noise_std`` z, z removed at the end
        (Algorithm 2 only: Algorithm 1 re-blurs every step, which does not carry z)."""
        if noise is not None:
            return super().sample(model, noise=noise, generator=generator, device=device,
                                  return_trajectory=return_trajectory, progress=progress, trajectory_points=trajectory_points)
        if shape is None:
            raise ValueError("sample() needs a shape or an initial noise tensor")
        prior = self.process.sample_prior(shape, generator, device)
        perturbation = self.prior_noise_std * randn(prior.shape, generator, prior.device, prior.dtype)
        out = super().sample(model, noise=prior + perturbation, generator=generator, device=device,
                             return_trajectory=return_trajectory, progress=progress, trajectory_points=trajectory_points)
        if not (self.improved and self.remove_prior_noise):
            return out
        samples = out.samples - perturbation
        if out.trajectory is not None:
            out.trajectory[-1] = samples.cpu()
        return out._replace(samples=samples)
