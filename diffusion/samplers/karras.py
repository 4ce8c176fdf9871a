"""Samplers on a sigma grid, Karras et al. (2022, "EDM"): Euler, Euler ancestral (k-diffusion), Heun and
DPM-Solver++(2M), for process=edm (its preconditioned denoiser) and for a DDPM table (process=gaussian) read as sigmas.
Each reads the process through six methods (``sigma_table``, ``sigma_range``, ``sigma_input``, ``sigma_time``,
``sigma_denoised``, ``sigma_prior_std``: :class:`diffusion.processes.edm.EDMProcess` and
:class:`diffusion.processes.gaussian.GaussianDiffusion` have them). For a DDPM table:

A discrete schedule alpha_bar_t is read as the variance-exploding process of EDM: with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the state x = x_0 + sigma eps is the VP state divided by
sqrt(alpha_bar) (EDM Table 1, "VP" with s(t) = 1 / sqrt(sigma^2 + 1); the form diffusers and k-diffusion use).
The network keeps its training scale: it sees x / sqrt(sigma^2 + 1) (:meth:`KarrasSampler.scale_model_input`) at
the t of sigma (diffusers' ``_sigma_to_t``: linear in log sigma between the schedule's sigmas; a Python float, so
the loop sends a float tensor; integer t on the schedule's own grid), and the denoiser is

    D(x; sigma) = x_0 predicted from the network's output at x / sqrt(sigma^2 + 1)   (any objective, clipped or not),

with which the probability-flow ODE is dx / dsigma = (x - D(x; sigma)) / sigma (EDM eq. 1 and 3, sigma(t) = t).

Grids (``sigmas``), each of ``num_steps`` noise levels then sigma_N = 0:

- ``karras``: EDM eq. 5, sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
  rho = 7, sigma_min and sigma_max the schedule's ends (t = 0 and t = T - 1);
- ``exponential``: log-linear from sigma_max to sigma_min (k-diffusion's ``get_sigmas_exponential``);
- ``schedule``: the schedule's own sigmas at the discrete grid of :func:`make_timesteps` (``spacing``).

x_T = ``init_noise_sigma`` * a N(0, I) draw, as diffusers' ``EulerDiscreteScheduler``: sigma_0 (the grid's first
sigma: sigma_max but on a schedule grid that starts lower) under ``spacing`` linspace or trailing, sqrt(sigma_0^2 + 1)
otherwise (leading, quadratic). The second is the VP prior draw exactly (the network's first input is the draw
itself); the first (k-diffusion's) is smaller by sqrt(1 + 1 / sigma_0^2), 1 + 2e-5 for the linear schedule's
sigma_max = 157.
"""

from __future__ import annotations

import math

import torch

from diffusion.checks import check_choice
from diffusion.processes.gaussian import sigma_to_t  # noqa: F401 - the sigma -> t map, also imported from here
from diffusion.samplers.base import (
    SPACINGS,
    Control,
    Sampler,
    StepOutput,
    TwoCallsPerStep,
    check_num_steps,
    check_number,
    make_timesteps,
)

SIGMA_GRIDS = ("karras", "exponential", "schedule")

__all__ = ["SIGMA_GRIDS", "DPMSolverPP2MSampler", "EulerAncestralSampler", "EulerSampler", "HeunSampler", "KarrasSampler",
           "exponential_sigmas", "karras_sigmas", "schedule_sigmas", "sigma_to_t"]


# ----------------------------------------------------------------------------------------------- the sigma grid
def schedule_sigmas(process) -> list[float]:
    """The discrete sigmas of ``process`` (increasing; its ``sigma_table``), or ValueError for a continuous one."""
    table = process.sigma_table()
    if table is None:
        raise ValueError(f"sampler sigmas=schedule is invalid for process={process.kind}: it has no discrete noise "
                         "levels; use sigmas=karras or sigmas=exponential")
    return table


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """EDM eq. 5: n noise levels from sigma_max down to sigma_min, spaced uniformly in sigma^(1/rho)."""
    if n == 1:
        return [sigma_max]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [sigma_max] + [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(1, n - 1)] + [sigma_min]  # exact ends


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """n noise levels from sigma_max down to sigma_min, uniform in log sigma."""
    if n == 1:
        return [sigma_max]
    hi, lo = math.log(sigma_max), math.log(sigma_min)
    return [sigma_max] + [math.exp(hi + i / (n - 1) * (lo - hi)) for i in range(1, n - 1)] + [sigma_min]


class KarrasSampler(Sampler):
    """The shared part: the sigma grid, the model-input scaling, the denoiser D(x; sigma) and the timesteps.

    A family lays its network calls on the grid in :meth:`_calls`: ``call_sigmas[i]`` is the sigma of the state the
    network sees at call i (and of the state after call i - 1); ``call_sigmas[nfe] = 0``, the final image.
    """

    controls = (Control("sigmas", "noise levels: karras (EDM eq. 5), exponential (log-linear), schedule (the schedule's own)",
                        choices=SIGMA_GRIDS),)

    reverses = ("gaussian", "edm")

    def __init__(self, process, num_steps: int | None = 20, sigmas: str = "karras", rho: float = 7.0,
                 spacing: str = "linspace", clip_denoised: bool = False):
        self.sigma_grid = check_choice("sampler sigmas", sigmas, SIGMA_GRIDS)
        self.rho = check_number("rho", rho, 0.0, low_open=True)
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    # -------------------------------------------------------------------------------------------- grid
    def set_timesteps(self, num_steps: int) -> None:
        self.sigma_min, self.sigma_max = self.process.sigma_range()
        if self.sigma_grid == "schedule":
            schedule = schedule_sigmas(self.process)
            grid_t = make_timesteps(self.T, num_steps, self.spacing)
            sigmas = [schedule[t] for t in grid_t]
        else:
            check_num_steps(num_steps, self.T, continuous=self.process.continuous_time)
            if self.sigma_grid == "karras":
                sigmas = karras_sigmas(self.sigma_min, self.sigma_max, num_steps, self.rho)
            else:
                sigmas = exponential_sigmas(self.sigma_min, self.sigma_max, num_steps)
            grid_t = None
        #: the solver's grid: sigma_0 > ... > sigma_{N-1} > sigma_N = 0
        self.sigmas: list[float] = sigmas + [0.0]
        self._grid_t = dict(zip(sigmas, grid_t)) if grid_t is not None else {}  # integer t of the schedule's sigmas
        self.call_sigmas: list[float] = self._calls(num_steps)
        timesteps = [self.t_of(s) for s in self.call_sigmas[:-1]]
        # the states' times: the paper's t of a discrete process (t + 1 of each call, 0 for x_0), else the sigmas
        states = list(self.call_sigmas) if self.process.continuous_time else [t + 1 for t in timesteps] + [0]
        self._set_grid(num_steps, timesteps, states)

    def _calls(self, num_steps: int) -> list[float]:
        """The sigma of each network call, then 0 (one call per step by default)."""
        return list(self.sigmas)

    def t_of(self, sigma: float) -> int | float:
        """The network's time input at ``sigma``: the schedule's integer t on its own grid, else the process's
        continuous time (a DDPM network's fractional t; EDM's c_noise)."""
        t = self._grid_t.get(sigma)
        return t if t is not None else self.process.sigma_time(sigma)

    @property
    def init_noise_sigma(self) -> float:
        """The std of x_T at sigma_0 (the process's ``sigma_prior_std``). DDPM: sqrt(sigma_0^2 + 1), so x_T is the VP
        prior draw exactly (the network's first input is that N(0, I) draw), on every schedule. diffusers'
        EulerDiscreteScheduler (and k-diffusion) start from sigma_0 under linspace or trailing spacing, smaller by
        sqrt(1 + 1 / sigma_0^2): 1 + 2e-5 for the linear T = 1000 schedule (sigma_max = 157), but 20% for linear T =
        100 (sigma_max = 1.32): the network would start from noise of std 0.8. EDM: sigma_0 (its Algorithm 1)."""
        return self.process.sigma_prior_std(self.sigmas[0])

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The network's input at call i (DDPM: x / sqrt(sigma_i^2 + 1), the VP state it was trained on; EDM:
        c_in x); at i = nfe (sigma = 0) x itself."""
        s = self.call_sigmas[i]
        return x if s == 0 else self.process.sigma_input(x, s)

    def display_state(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x / sqrt(sigma_i^2 + 1): the variance-preserving equivalent of the state (DDPM's x_t itself; for EDM, whose
        network input c_in x is about 2 x_0 near the end, what keeps a trajectory in the image range)."""
        s = self.call_sigmas[i]
        return x if s == 0 else x / math.sqrt(s * s + 1)

    def denoise(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """D(x; sigma_i) from the output of call i (the process's ``sigma_denoised``), clamped to [-1, 1] with
        ``clip_denoised``."""
        denoised = self.process.sigma_denoised(model_output, x, self.call_sigmas[i])
        return denoised.clamp(-1.0, 1.0) if self.clip_denoised else denoised

    def describe(self) -> str:
        grid = f"{self.sigma_grid} sigmas" + {"karras": f" rho {self.rho:g}", "schedule": f" ({self.spacing})"}.get(
            self.sigma_grid, "")
        return f"{super().describe()}, {grid}"


class EulerSampler(KarrasSampler):
    """Euler's method on the probability-flow ODE (EDM Algorithm 1 without its second-order correction):

        d_i = (x_i - D(x_i; sigma_i)) / sigma_i,   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i.

    It is diffusers' ``EulerDiscreteScheduler`` (s_churn = 0) and k-diffusion's ``sample_euler``; the last step
    (to sigma = 0) returns D itself. One network call per step."""

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        sigma, sigma_next = self.call_sigmas[i], self.call_sigmas[i + 1]
        denoised = self.denoise(model_output, x, i)
        if sigma_next == 0:  # x + (0 - sigma) (x - D) / sigma = D, without the rounding
            return StepOutput(denoised, denoised)
        d = (x - denoised) / sigma  # dx/dsigma, EDM eq. 1 with the score (D - x) / sigma^2 (eq. 3)
        return StepOutput(x + (sigma_next - sigma) * d, denoised)


class EulerAncestralSampler(KarrasSampler):
    """k-diffusion's ``sample_euler_ancestral``: an Euler step down to sigma_down, then fresh noise of std sigma_up,

        sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),
        x_next = x + (sigma_down - sigma) d + s_noise sigma_up z.

    eta = 1 is ancestral (DDPM-like) sampling in sigma form and diffusers' ``EulerAncestralDiscreteScheduler``
    (which has no eta); eta = 0 is Euler. No noise after the last step (sigma_next = 0)."""

    controls = KarrasSampler.controls + (
        Control("eta", "eta: 1 ancestral (fresh noise every step, DDPM-like), 0 deterministic Euler", 0.0, 1.0, 0.05),)

    def __init__(self, process, num_steps: int | None = 20, sigmas: str = "karras", rho: float = 7.0,
                 spacing: str = "linspace", eta: float = 1.0, s_noise: float = 1.0, clip_denoised: bool = False):
        self.eta = check_number("eta", eta)
        self.s_noise = check_number("s_noise", s_noise)
        super().__init__(process, num_steps=num_steps, sigmas=sigmas, rho=rho, spacing=spacing,
                         clip_denoised=clip_denoised)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def ancestral_step(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        """(sigma_down, sigma_up): the noise level the deterministic part reaches and the std of the noise added."""
        if self.eta == 0 or sigma_next == 0:
            return sigma_next, 0.0
        sigma_up = min(sigma_next, self.eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        sigma, sigma_next = self.call_sigmas[i], self.call_sigmas[i + 1]
        denoised = self.denoise(model_output, x, i)
        if sigma_next == 0:  # sigma_down = sigma_up = 0: the Euler step lands on D
            return StepOutput(denoised, denoised)
        sigma_down, sigma_up = self.ancestral_step(sigma, sigma_next)
        d = (x - denoised) / sigma
        x_next = x + (sigma_down - sigma) * d
        if sigma_up > 0 and self.s_noise > 0:
            x_next = x_next + (self.s_noise * sigma_up) * self.noise_like(x, generator)
        return StepOutput(x_next, denoised)

    def describe(self) -> str:
        return f"{super().describe()}, eta {self.eta:g}" + (f", s_noise {self.s_noise:g}" if self.s_noise != 1 else "")


class HeunSampler(TwoCallsPerStep, KarrasSampler):
    """EDM Algorithm 2: Heun's second-order method with stochastic churn; Euler on the last step (to sigma = 0).

    Step k, from sigma_k to sigma_{k+1}:
        gamma_k = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_k <= s_tmax else 0,  sigma^_k = (1 + gamma_k) sigma_k
        x^_k = x_k + sqrt(sigma^_k^2 - sigma_k^2) s_noise z                                         (lines 4-6)
        d_k = (x^_k - D(x^_k; sigma^_k)) / sigma^_k,  x_{k+1} = x^_k + (sigma_{k+1} - sigma^_k) d_k       (7-8)
        if sigma_{k+1} > 0:  d'_k = (x_{k+1} - D(x_{k+1}; sigma_{k+1})) / sigma_{k+1},
                             x_{k+1} = x^_k + (sigma_{k+1} - sigma^_k) (d_k + d'_k) / 2                 (9-11)

    Each network call is one entry of ``timesteps`` (as diffusers' ``HeunDiscreteScheduler``, which repeats its
    timesteps): the Euler call, then the correction at sigma_{k+1}; N steps cost 2N - 1 calls. The Euler half-step
    (x^_k, d_k) is kept between the two calls and cleared by :meth:`reset`. ``s_churn = 0`` is deterministic (and
    diffusers' Heun); churn noise is added at the end of the step before (for step 0: in ``init_noise_sigma``,
    x^_0 ~ N(0, init^2 + sigma^_0^2 - sigma_0^2), the same law), so the network always sees the churned state.
    sigma^_k is capped at the schedule's sigma_max: a discrete-time network knows no larger noise level.
    """

    controls = KarrasSampler.controls + (
        Control("s_churn", "S_churn: noise re-added per step (EDM; 0 deterministic)", 0.0, 80.0, 1.0),)

    def __init__(self, process, num_steps: int | None = 10, sigmas: str = "karras", rho: float = 7.0,
                 spacing: str = "linspace", s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float | None = None,
                 s_noise: float = 1.0, clip_denoised: bool = False):
        self.s_churn = check_number("s_churn", s_churn)
        self.s_tmin = check_number("s_tmin", s_tmin)
        if s_tmax is None or s_tmax == math.inf:
            self.s_tmax = math.inf
        else:
            self.s_tmax = check_number("s_tmax", s_tmax)
        if self.s_tmax < self.s_tmin:
            raise ValueError(f"sampler s_tmax={s_tmax!r} is invalid: it must be >= s_tmin={s_tmin!r} (null: no upper bound)")
        self.s_noise = check_number("s_noise", s_noise)
        super().__init__(process, num_steps=num_steps, sigmas=sigmas, rho=rho, spacing=spacing,
                         clip_denoised=clip_denoised)

    @property
    def stochastic(self) -> bool:
        return any(g > 0 for g in self.gammas) and self.s_noise > 0

    def _calls(self, num_steps: int) -> list[float]:
        sig = self.sigmas
        churn = min(self.s_churn / num_steps, math.sqrt(2) - 1)
        #: gamma_k of each step (EDM Algorithm 2, line 4); on a DDPM table capped so that sigma^_k <= its sigma_max
        #: (no larger noise level is known there), uncapped on a continuous process (EDM: any sigma is defined)
        def cap(s: float) -> float:
            return math.inf if self.process.continuous_time else self.sigma_max / s - 1

        self.gammas = [min(churn, cap(s)) if self.s_tmin <= s <= self.s_tmax else 0.0 for s in sig[:-1]]
        self.sigma_hats = [s * (1 + g) for s, g in zip(sig[:-1], self.gammas)]
        calls, self._is_correction, self._step_of = [], [], []  # per call: its sigma, whether it corrects, its step
        for k in range(num_steps):
            calls.append(self.sigma_hats[k])
            self._is_correction.append(False)
            self._step_of.append(k)
            if sig[k + 1] > 0:
                calls.append(sig[k + 1])
                self._is_correction.append(True)
                self._step_of.append(k)
        return calls + [0.0]

    @property
    def init_noise_sigma(self) -> float:
        """diffusers' rule on sigma_0 (see :class:`KarrasSampler`), widened by step 0's churn (line 6)."""
        s0, s_hat = self.sigmas[0], self.sigma_hats[0]
        return math.sqrt(super().init_noise_sigma ** 2 + (s_hat**2 - s0**2) * self.s_noise**2)

    def reset(self) -> None:
        """Forget the Euler half-step (x^_k, d_k) kept for the correction."""
        self._x_hat = self._d = None

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        sigma, sigma_next = self.call_sigmas[i], self.call_sigmas[i + 1]
        denoised = self.denoise(model_output, x, i)
        if sigma_next == 0:  # the last step is Euler's (line 8), which lands on D at sigma = 0
            return StepOutput(denoised, denoised)
        d = (x - denoised) / sigma
        if not self._is_correction[i]:  # the Euler step from x^_k at sigma^_k (lines 7-8)
            self._x_hat, self._d = x, d  # a correction follows
            return StepOutput(x + (sigma_next - sigma) * d, denoised)
        if self._x_hat is None:
            raise ValueError(f"step index {i} is a Heun correction: call step({i - 1}) first (or sample())")
        x_hat, d_prev = self._x_hat, self._d
        sigma_hat = self.call_sigmas[i - 1]
        x_next = x_hat + (sigma - sigma_hat) * (0.5 * (d_prev + d))  # the trapezoidal rule (lines 9-11)
        self._x_hat = self._d = None
        return StepOutput(self._churn(x_next, self._step_of[i] + 1, generator), denoised)

    def _churn(self, x: torch.Tensor, k: int, generator) -> torch.Tensor:
        """x^_k = x_k + sqrt(sigma^_k^2 - sigma_k^2) s_noise z, z ~ N(0, I), before step k (EDM lines 4-6)."""
        sigma, sigma_hat = self.sigmas[k], self.sigma_hats[k]
        if sigma_hat == sigma or self.s_noise == 0:
            return x
        return x + (math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise) * self.noise_like(x, generator)

    def describe(self) -> str:
        text = super().describe()
        if self.s_churn > 0:
            tmax = "inf" if self.s_tmax == math.inf else f"{self.s_tmax:g}"
            text += f", churn {self.s_churn:g} on [{self.s_tmin:g}, {tmax}], s_noise {self.s_noise:g}"
        return text


class DPMSolverPP2MSampler(KarrasSampler):
    """DPM-Solver++(2M) on the sigma grid (Lu et al. 2022, Algorithm 2; k-diffusion's ``sample_dpmpp_2m``), for any
    process with the sigma interface (EDM's denoiser, or a DDPM table read as sigmas). With lambda = -ln sigma
    (alpha = 1 in the variance-exploding form) and h_i = lambda_{i+1} - lambda_i:

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h_i} - 1) D_i'                                  (eq. 9, VE form)
        D_i' = D_i (first step, and the last, to sigma = 0),  else (1 + 1 / 2r) D_i - (1 / 2r) D_{i-1},  r = h_{i-1} / h_i

    The last step (sigma_{i+1} = 0: h = inf) lands on D itself. One network call per step; the previous D is kept
    between steps and cleared by :meth:`reset`. (``sampler=dpmsolver++`` is the same solver on a DDPM table's own
    timesteps, in alpha/sigma form; this one takes the Karras grid and reverses process=edm too.)"""

    def reset(self) -> None:
        self._previous = None  # D at the previous call

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        sigma, sigma_next = self.call_sigmas[i], self.call_sigmas[i + 1]
        denoised = self.denoise(model_output, x, i)
        previous, self._previous = self._previous, denoised
        if sigma_next == 0:
            return StepOutput(denoised, denoised)
        h = math.log(sigma) - math.log(sigma_next)
        if previous is not None and i > 0:
            r = (math.log(self.call_sigmas[i - 1]) - math.log(sigma)) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        else:
            target = denoised
        return StepOutput((sigma_next / sigma) * x - math.expm1(-h) * target, denoised)
