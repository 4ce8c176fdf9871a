"""PLMS and PNDM, Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds" (arXiv:2202.09778).

A pseudo numerical method splits a step into a *gradient part*, a classical multistep or Runge-Kutta combination
of the network's noise predictions e, and a *transfer part* phi, which moves x_t to x_{t-delta} along the DDIM
map with that combined noise (eq. 9; equal to DDIM's eq. 12 with eta = 0, Song et al. 2021; equation numbers as
diffusers cites the paper):

    phi(x_t, e', t, t-delta) = sqrt(abar_{t-delta}) x0' + sqrt(1 - abar_{t-delta}) e',
    x0' = (x_t - sqrt(1 - abar_t) e') / sqrt(abar_t).

- :class:`PLMSSampler` (``sampler=plms``, diffusers' ``PNDMScheduler(skip_prk_steps=True)``, crowsonkb's PLMS of
  latent-diffusion): the pseudo linear multistep method, e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24
  (Adams-Bashforth 4, eq. 12), warmed up with lower orders: the first step is a pseudo improved Euler (a DDIM step,
  then the network again at the predicted x_{t-d}, then phi from x_t with the mean of the two noises: two calls at
  the same timestep, diffusers' repeated grid entry), then AB2 (3 e_t - e_{t-d}) / 2, AB3 (23, -16, 5) / 12, AB4.
  NFE = num_steps + 1 (1 for num_steps = 1).
- :class:`PNDMSampler` (``sampler=pndm``, F-PNDM, diffusers' ``PNDMScheduler(skip_prk_steps=False)``): the first
  three steps by the pseudo Runge-Kutta method (eq. 13; four calls each: e1 at (x_t, t), e2 at
  (phi(x_t, e1, t, m), m), e3 at (phi(x_t, e2, t, m), m), e4 at (phi(x_t, e3, t, t-d), t-d), e' = (e1 + 2 e2 + 2 e3
  + e4) / 6, m the midpoint), which also fill the history with e1 of each, then AB4. NFE = num_steps + 9.

The grid is the DDIM sub-grid of :func:`make_timesteps` (``leading`` = diffusers' ``timestep_spacing="leading"``
with ``steps_offset=0``: t = (N-1) k, ..., k, 0 with k = T // N; the paper's code ``range(0, T, skip)``), and the
timesteps list has one entry per network call, exactly diffusers' ``prk_timesteps + plms_timesteps``: for PLMS
``[g_0, g_1, g_1, g_2, ..., g_{N-1}]``, for PNDM ``[g_0, m_0, m_0, g_1, g_1, m_1, m_1, g_2, g_2, m_2, m_2, g_3, g_3,
g_4, ..., g_{N-1}]`` with the integer midpoint m_j = g_{j+1} + (g_j - g_{j+1}) // 2 (diffusers' ``t_next + k // 2``).
Each step goes from a grid entry to the *next entry* of the grid (not ``t - T // N``, which is wrong under the
``linspace`` spacing), and the last step lands on x_0 with abar = 1 (diffusers' ``set_alpha_to_one=True``, as this
project's DDIM).

Where diffusers and the paper differ, and what this file does:

- the paper's code (luping-liu/PNDM) calls the network at the fractional midpoint (t + t_next) / 2; diffusers and
  this file at the integer m_j above (equal when k is even);
- for odd k diffusers lands the first Runge-Kutta stage at ``t - k // 2`` while it evaluates the network at
  ``t_next + k // 2``, one training step apart; here the stage lands where the network is next evaluated (m_j), so
  every call sees a state at its own timestep (identical to diffusers for even k: T = 1000 with 50 or 100 steps);
- the paper's code reads abar one index late in its transfer (``alphas_cump[t + 1]``), so its last step lands at
  abar_0 rather than 1; diffusers defaults to ``set_alpha_to_one=False`` (abar_0); here x_0 has abar = 1;
- the paper's S-PNDM warms up its order-2 multistep with the improved Euler step; diffusers' PLMS (and this file)
  use that warm-up for the order-4 multistep, going through AB2 and AB3;
- objectives: every network output is turned into (x0, eps) at its own input and timestep
  (:meth:`Sampler.predict_x0_eps`), and the multistep combines those eps (eq. 12 is a combination of noises).
  diffusers' ``prediction_type="v_prediction"`` instead combines the raw v outputs of different states and
  converts the combination with the *current* x_t and abar_t, which is not the combination of their noises: an
  O(delta) error in e' that makes its v sampler first order (tests/samplers/test_pndm.py measures it). So eps, x0 and v
  networks that agree give the same samples here.

Accuracy (tests/samplers/test_pndm.py, Gaussian data with the exact denoiser, linear schedule, leading grid): the multistep
runs on a grid uniform in t, and near t = 0 the noise prediction varies like sqrt(1 - abar_t) ~ sqrt(t + 1), so
the global order is well below the 4 of eq. 12 and the error is made in the last steps (mid-chain it is ~100x
smaller). Fitted over NFE 10..80 the error falls like NFE^-2.0 (PNDM NFE^-3.0 over 14..80, from its large warm-up
error at low NFE), with a plateau near 5e-3 between NFE 20 and 40; it is 25 to 45 times below DDIM's at equal NFE
from NFE 20 (3 times at NFE 10). PNDM's 12-call warm-up makes it the worse of the two below ~30 NFE. Starting where
abar ~ 0 (``trailing`` with a cosine schedule: abar_{T-1} ~ 1e-9) the extrapolated noises are amplified by
sqrt((1 - abar) / abar) in x0' and both this file and diffusers blow up; use ``leading`` there.

``clip_denoised``: every call's predicted x_0 is clamped to [-1, 1] (its eps recomputed from the clamped x_0 at
that call's own x and t), and the transfer's x0' of the combined e' is clamped again (e' recomputed from it at
x_t; the paper's code has a variant, ``transfer_dev``, that clamps x0' in the transfer); the first PLMS step is then exactly a clipped DDIM step, the returned
``pred_x0`` is always in [-1, 1], and so is the final sample (abar = 1 makes x_0 = x0').
"""

from __future__ import annotations

import math

from diffusion.checks import check_choice
from diffusion.processes.gaussian import GaussianDiffusion
from diffusion.processes.objectives import eps_from_x0, x0_from_eps
from diffusion.samplers.base import SPACING_CONTROL, SPACINGS, Sampler, StepOutput, make_timesteps

__all__ = ["PLMSSampler", "PNDMSampler", "ADAMS_BASHFORTH"]

#: Adams-Bashforth coefficients of orders 1-4 on the newest-first history e_t, e_{t-d}, ... (eq. 12 is order 4)
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
#: the pseudo Runge-Kutta weights of e1..e4 (eq. 13)
RUNGE_KUTTA = (1 / 6, 1 / 3, 1 / 3, 1 / 6)

# What a call does with its noise (its "stage"):
_MULTISTEP = "multistep"  # append to the history, transfer x with AB_k of the newest k <= 4
_EULER = "euler"  # PLMS warm-up, call 0: remember x_t and e_t, transfer with e_t (a DDIM step)
_HEUN = "heun"  # PLMS warm-up, call 1: transfer the remembered x_t with (e_t + e_{t-d}) / 2; not kept in the history
_RK = ("rk1", "rk2", "rk3", "rk4")  # PNDM's four Runge-Kutta stages


class PLMSSampler(Sampler):
    """The pseudo linear multistep method (eq. 12) with the improved-Euler, AB2, AB3 warm-up (diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``); see the module docstring for the grid and the differences to diffusers.

    ``num_steps``: steps of the grid (NFE = num_steps + 1: the warm-up calls the network twice at the second grid
    entry); ``spacing``: the grid (:func:`make_timesteps`); ``clip_denoised``: clamp the predicted x_0 to [-1, 1].
    """

    #: the Runge-Kutta warm-up of F-PNDM (:class:`PNDMSampler`) instead of the improved Euler one
    runge_kutta_warmup: bool = False
    #: grid steps taken by the Runge-Kutta warm-up, four network calls each
    RK_STEPS = 3

    controls = (SPACING_CONTROL,)

    def __init__(self, process: GaussianDiffusion, num_steps: int | None = 50, spacing: str = "leading",
                 clip_denoised: bool = False):
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    # ----------------------------------------------------------------------------------------------- the grid
    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        """The largest ``num_steps`` whose run costs at most ``nfe`` network calls (exactly ``nfe`` for nfe != 2)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe={nfe!r} is invalid for sampler plms: it must be an integer >= 1")
        return 1 if nfe <= 2 else nfe - 1

    def set_timesteps(self, num_steps: int) -> None:
        grid = make_timesteps(self.T, num_steps, self.spacing)  # g_0 > g_1 > ... > g_{N-1}
        table = self.process.alphas_cumprod.detach().double().cpu().tolist()

        def abar(t: int) -> float:  # t = -1 is x_0: alpha_bar = 1 (set_alpha_to_one)
            return 1.0 if t < 0 else table[t]

        nxt = grid[1:] + [-1]  # each step goes to the next grid entry; the last one to x_0
        # one entry per network call: (network t, stage, alpha_bar the transfer starts from, and lands at)
        plan: list[tuple[int, str, float, float]] = []
        first = 0
        if self.runge_kutta_warmup:
            for g, g_next in zip(grid[: self.RK_STEPS], nxt[: self.RK_STEPS]):
                mid = g_next + (g - g_next) // 2  # diffusers' integer midpoint t_next + k // 2
                a, a_mid, a_next = abar(g), abar(mid), abar(g_next)
                plan += [(g, "rk1", a, a_mid), (mid, "rk2", a, a_mid), (mid, "rk3", a, a_next),
                         (g_next, "rk4", a, a_next)]
            first = self.RK_STEPS
        elif num_steps > 1:  # improved Euler: DDIM to g_1, the network at g_1, back to g_0 and to g_1 again
            g, g_next = grid[0], nxt[0]
            plan += [(g, _EULER, abar(g), abar(g_next)), (g_next, _HEUN, abar(g), abar(g_next))]
            first = 1
        plan += [(g, _MULTISTEP, abar(g), abar(g_next)) for g, g_next in zip(grid[first:], nxt[first:])]
        self._plan = [(t, stage, abar(t), a, a_next) for t, stage, a, a_next in plan]  # + abar at the call's t
        self._set_grid(num_steps, [p[0] for p in plan])

    def reset(self) -> None:
        """Forget the noise history and the warm-up's remembered state (every ``sample()`` starts empty)."""
        self.ets: list = []  # the history e_t, oldest first; at most 4 kept
        self._x_start = None  # the state the warm-up's stages transfer from (x_t of the current step)
        self._e_weighted = None  # PNDM: the running e1/6 + e2/3 + e3/3; PLMS: e_t of the improved Euler step

    # ----------------------------------------------------------------------------------------------- one call
    def _transfer(self, x, e, a: float, a_next: float):
        """phi(x, e, t, t_next) (eq. 9, written as DDIM's eq. 12 with eta = 0) and its x0'; with clip_denoised
        x0' is clamped to [-1, 1] and e recomputed from it at (x, abar_t)."""
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        x0 = x0_from_eps(x, e, alpha, sigma)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            e = eps_from_x0(x, x0, alpha, sigma)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * e, x0

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        t, stage, a_t, a, a_next = self._plan[i]
        # this call's noise, at its own input x and timestep t (every objective; clipped x_0 if asked)
        _, e = self.predict_x0_eps(model_output, x, math.sqrt(a_t), math.sqrt(1 - a_t))
        start = x
        if stage == _MULTISTEP:
            self.ets = self.ets[-3:] + [e]
            coefs = ADAMS_BASHFORTH[len(self.ets)]
            e_prime = sum(c * e_j for c, e_j in zip(coefs, reversed(self.ets)))  # eq. 12 (lower orders warm up)
        elif stage == _EULER:
            self.ets, self._x_start, self._e_weighted = [e], x, e
            e_prime = e
        elif stage == _HEUN:  # improved Euler: the mean of the noises at both ends, from the remembered x_t
            start, e_prime = self._x_start, (self._e_weighted + e) / 2
            self._x_start = self._e_weighted = None
        else:  # pseudo Runge-Kutta (eq. 13)
            k = _RK.index(stage)
            if k == 0:  # e1 at the step's start x_t: it joins the multistep history
                self.ets, self._x_start, self._e_weighted = self.ets + [e], x, 0.0
            start = self._x_start  # every stage transfers from x_t
            self._e_weighted = self._e_weighted + RUNGE_KUTTA[k] * e
            e_prime = e if k < 3 else self._e_weighted  # stages 1-3 probe with their own e; stage 4 steps with e'
            if k == 3:
                self._x_start = self._e_weighted = None
        x_next, pred_x0 = self._transfer(start, e_prime, a, a_next)
        return StepOutput(x_next, pred_x0)


class PNDMSampler(PLMSSampler):
    """F-PNDM: three pseudo Runge-Kutta steps (eq. 13, four calls each) warm up the pseudo linear multistep method
    (eq. 12); diffusers' ``PNDMScheduler(skip_prk_steps=False)``. NFE = num_steps + 9; ``num_steps`` >= 4."""

    runge_kutta_warmup = True

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        """``nfe - 9``: the Runge-Kutta warm-up costs 12 calls for 3 steps, so nfe >= 13."""
        low = 4 * cls.RK_STEPS + 1
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < low:
            raise ValueError(f"nfe={nfe!r} is invalid for sampler pndm: its Runge-Kutta warm-up alone takes "
                             f"{4 * cls.RK_STEPS} network calls, so nfe must be an integer >= {low} (sampler=plms "
                             "runs on fewer)")
        return nfe - 3 * cls.RK_STEPS

    def set_timesteps(self, num_steps: int) -> None:
        if isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps <= self.RK_STEPS:
            raise ValueError(f"sampler pndm num_steps={num_steps!r} is invalid: its Runge-Kutta warm-up takes "
                             f"{self.RK_STEPS} steps and the multistep at least one, so num_steps must be an integer "
                             f"in [{self.RK_STEPS + 1}, T={self.T}] (sampler=plms runs on fewer)")
        super().set_timesteps(num_steps)
