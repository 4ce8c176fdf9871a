"""DPM-Solver++, Lu et al. (2022b), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models": multistep exponential integrators of the diffusion ODE (and SDE) written in the data prediction x_0.

Notation of the paper: x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
lambda_t = log(alpha_t / sigma_t) (half the log-SNR), decreasing in t. Over one step from s (the current grid point)
to t (the next, less noisy one), h = lambda_t - lambda_s > 0. The ODE with the data prediction x_theta has the exact
solution (Prop. 4.1 of the paper)

    x_t = sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) d lambda,

and its k-th order solvers integrate x_theta's Taylor polynomial in lambda around lambda_s exactly (section 4.1 of
the paper; DPM-Solver, Lu et al. 2022a, does the same with the noise prediction): order 1 (x_theta constant) is
DPM-Solver++1, which is DDIM; the multistep orders 2 and 3 estimate the lambda-derivatives of x_theta from the previous
steps' predictions by divided differences (2M: Algorithm 2 of the paper; 3M: the same with a second divided
difference). The SDE variant (sde-dpmsolver++, in the paper's code and diffusers) integrates the linear part of the
reverse SDE exactly in the same variables and adds sigma_t sqrt(1 - e^{-2h}) z. UniPC (:class:`UniPCSampler`) is the
same family: DPM-Solver++'s first-order update plus divided differences, with a corrector.
"""

from __future__ import annotations

import math

import torch

from diffusion.checks import check_choice
from diffusion.processes.gaussian import GaussianDiffusion
from diffusion.samplers.base import (
    SPACING_CONTROL,
    SPACINGS,
    Control,
    Sampler,
    StepOutput,
    check_num_steps,
    make_timesteps,
)

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
UNIPC_SOLVER_TYPES = ("bh2", "bh1")
ORDERS = (1, 2, 3)
#: below this many steps the last steps use lower orders (diffusers' ``lower_order_final`` threshold)
LOWER_ORDER_FINAL_BELOW = 15


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep (orders 1, 2, 3) on a discrete timestep grid, in diffusers' conventions.

    ``algorithm_type``: ``dpmsolver++`` (the probability-flow ODE, deterministic) or ``sde-dpmsolver++`` (the
    reverse SDE discretised the same way, stochastic; its order 1 is DDPM's posterior step, i.e. DDIM with eta = 1).
    ``solver_type``: how order 2 weights the first divided difference, ``midpoint`` (Algorithm 2 of the paper) or
    ``heun`` (the exact integral of a linear x_theta in lambda); orders 1 and 3 ignore it.

    The grid (``spacing``) is diffusers' ``DPMSolverMultistepScheduler``'s: for ``linspace`` (diffusers' default,
    ``round(linspace(0, T-1, num_steps+1))`` without its 0: the first call at t = T-1), ``leading`` and
    ``quadratic`` the ``num_steps + 1``-point grid of :func:`make_timesteps` without its last point t = 0; for
    ``trailing`` the ``num_steps``-point grid. The last step goes to x_0 itself (sigma = 0, diffusers'
    ``final_sigmas_type="zero"``): its h is infinite, so it is of order 1 and returns the data prediction at the
    last grid point -- under an exact model E[x_0 | x_t], a posterior mean, with less spread than the data while that
    point (t ~ T / num_steps) is still noisy. ``lower_order_final`` (diffusers' default): with fewer than 15 steps
    the step before it uses order <= 2 (only order 3 feels it). ``clip_denoised`` clamps every x_0 prediction to
    [-1, 1] before it enters the update: diffusers' ``thresholding=True`` with ``sample_max_value=1`` (dynamic
    thresholding whose bound cannot exceed 1 is a static clip).

    Order 3 differs from diffusers' (see :meth:`step`): theirs is second order, this one is exact for a quadratic
    x_theta. Its warm-up steps are of orders 1 and 2, as everywhere, so its global error is formally O(h^2) too, with
    a small constant. With the SDE, orders above 2 gain little (the divided differences see the injected noise).

    Multistep state (the previous steps' x_0 predictions) lives here and is cleared by :meth:`reset` (at every
    ``sample`` call and every new grid); steps must be taken in order.
    """

    controls = (Control("order", "solver order (1 = DDIM)", choices=ORDERS),
                Control("algorithm_type", "dpmsolver++: the ODE, deterministic; sde-dpmsolver++: the reverse SDE, stochastic",
                        choices=ALGORITHM_TYPES), SPACING_CONTROL)

    def __init__(self, process: GaussianDiffusion, num_steps: int | None = 20, order: int = 2,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 spacing: str = "linspace", clip_denoised: bool = False):
        if isinstance(order, bool) or order not in ORDERS:
            raise ValueError(f"sampler order={order!r} is invalid: allowed values are 1, 2, 3")
        self.order = int(order)
        self.algorithm_type = check_choice("sampler algorithm_type", algorithm_type, ALGORITHM_TYPES)
        self.solver_type = check_choice("sampler solver_type", solver_type, SOLVER_TYPES)
        if type(lower_order_final) is not bool:
            raise ValueError(f"sampler lower_order_final={lower_order_final!r} is invalid: it must be true or false")
        self.lower_order_final = lower_order_final
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        self._history: list[tuple[int, float, object]] = []  # (call index, lambda, x_0 prediction) of past steps
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    # ----------------------------------------------------------------------------------------------- grid
    def set_timesteps(self, num_steps: int) -> None:
        T = self.T
        if self.spacing == "trailing":
            grid = make_timesteps(T, check_num_steps(num_steps, T), "trailing")
        else:  # num_steps + 1 points, the last (t = 0) replaced by x_0 itself
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T - 1:
                raise ValueError(f"sampler num_steps={num_steps!r} is invalid with spacing={self.spacing}: it must be "
                                 f"an integer in [1, T-1={T - 1}] (num_steps + 1 grid points, t = 0 dropped)")
            try:
                grid = make_timesteps(T, num_steps + 1, self.spacing)[:-1]
            except ValueError:
                raise ValueError(f"sampler spacing={self.spacing!r} with num_steps={num_steps} repeats timesteps for "
                                 f"T={T}: use fewer steps or spacing=linspace") from None
        abar = self.process.alphas_cumprod.detach().double().cpu().tolist()
        # alpha, sigma, lambda = log(alpha / sigma) of every grid point, then of x_0 (1, 0, +inf)
        self._alpha = [math.sqrt(abar[t]) for t in grid] + [1.0]
        self._sigma = [math.sqrt(1.0 - abar[t]) for t in grid] + [0.0]
        self._lambda = [math.log(a) - math.log(s) for a, s in zip(self._alpha[:-1], self._sigma[:-1])] + [math.inf]
        self._set_grid(num_steps, grid)  # state_times: t + 1 of each call, then 0 (x_0)

    def reset(self) -> None:
        self._history = []

    def step_order(self, i: int) -> int:
        """The order of step ``i`` (diffusers' rule): the warm-up uses what history exists (min(order, i + 1)); the
        step to x_0 is first order (h = inf); with ``lower_order_final`` and fewer than 15 steps the one before it
        is of order <= 2."""
        n = self.nfe
        if i == n - 1:
            return 1
        order = min(self.order, i + 1)
        if self.lower_order_final and n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
            order = min(order, 2)
        return order

    # ----------------------------------------------------------------------------------------------- update
    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        if i == 0:
            self._history = []
        elif not self._history or self._history[-1][0] != i - 1:
            raise ValueError(f"step index {i} is invalid here: the multistep state holds step "
                             f"{self._history[-1][0] if self._history else 'none'}; take the steps in order "
                             "(0, 1, ...) after reset()")
        alpha_s, sigma_s, lambda_s = self._alpha[i], self._sigma[i], self._lambda[i]
        alpha_t, sigma_t, lambda_t = self._alpha[i + 1], self._sigma[i + 1], self._lambda[i + 1]
        # m0 = x_theta(x_s, s): the data prediction of any objective (eps, x0, v), clipped under clip_denoised
        m0, _ = self.predict_x0_eps(model_output, x, alpha_s, sigma_s)
        self._history = (self._history + [(i, lambda_s, m0)])[-self.order:]
        order = self.step_order(i)
        sde = self.algorithm_type == "sde-dpmsolver++"
        h = lambda_t - lambda_s  # > 0; +inf on the step to x_0 (order 1 there)
        phi1, phi2, phi3 = self.phi(h, sde)

        # the linear part exactly, then x_theta's Taylor polynomial in lambda integrated exactly:
        #   ODE: x_t = sigma_t/sigma_s x_s + alpha_t (phi1 x_theta + phi2 h x_theta' + phi3 h^2 x_theta'' + ...)
        #   SDE: x_t = sigma_t/sigma_s e^{-h} x_s + alpha_t (phi1 x_theta + ...) + sigma_t sqrt(1 - e^{-2h}) z
        # Order 1 is DPM-Solver++1 (= DDIM for the ODE, DDPM's posterior step given x_theta for the SDE).
        x_t = (sigma_t / sigma_s * (math.exp(-h) if sde else 1.0)) * x + (alpha_t * phi1) * m0
        if order >= 2:
            _, lambda_s1, m1 = self._history[-2]
            r0 = (lambda_s - lambda_s1) / h
            D1_0 = (m0 - m1) / r0  # h (m0 - m1) / h_0 = h x_theta' + O(h^2)
            if order == 2 and self.solver_type == "midpoint":
                # 2M (Algorithm 2): D = (1 + 1/(2 r)) m0 - 1/(2 r) m1 in place of x_theta in the order-1 update
                x_t = x_t + (0.5 * alpha_t * phi1) * D1_0
            elif order == 2:  # heun: the Taylor term itself
                x_t = x_t + (alpha_t * phi2) * D1_0
            else:
                _, lambda_s2, m2 = self._history[-3]
                r1 = (lambda_s1 - lambda_s2) / h
                D1_1 = (m1 - m2) / r1
                # 3M: D1 = h x_theta' + O(h^3), D2 = h^2 x_theta'' + O(h^3) (divided differences on the three
                # lambdas). diffusers' and dpm_solver's multistep 3M use half this D2 (their singlestep Taylor
                # update uses this one), and diffusers' sde-dpmsolver++ 3M also flips the sign of the 1/2 in phi3:
                # both make the update inexact for a quadratic x_theta, hence only second order (first for the SDE).
                D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                D2 = 2.0 * (D1_0 - D1_1) / (r0 + r1)
                x_t = x_t + (alpha_t * phi2) * D1 + (alpha_t * phi3) * D2
        if sde and sigma_t > 0:
            x_t = x_t + (sigma_t * math.sqrt(-math.expm1(-2.0 * h))) * self.noise_like(x, generator)
        return StepOutput(x_t, m0)

    @staticmethod
    def phi(h: float, sde: bool = False) -> tuple[float, float, float]:
        """(phi1, phi2, phi3): int_0^h w(u) u^k / k! du / h^k for k = 0, 1, 2, the weights of x_theta, h x_theta' and
        h^2 x_theta'' in one step of log-SNR length h, with w(u) = e^{-(h-u)} (ODE: sigma_t e^lambda / alpha_t,
        Prop. 4.1 of the paper) or 2 e^{-2(h-u)} (SDE). Closed forms, with E = e^{-h} (ODE) or e^{-2h} (SDE):

            ODE: phi1 = 1 - E,  phi2 = 1 - (1 - E) / h,       phi3 = 1/2 - 1/h + (1 - E) / h^2
            SDE: phi1 = 1 - E,  phi2 = 1 - (1 - E) / (2h),    phi3 = 1/2 - 1/(2h) + (1 - E) / (4h^2)

        ``h = inf`` (the step to x_0) gives phi1 = 1 (the others are unused there)."""
        if math.isinf(h):
            return 1.0, 1.0, 0.5
        c = 2.0 if sde else 1.0
        one_minus_E = -math.expm1(-c * h)
        return one_minus_E, 1.0 - one_minus_E / (c * h), 0.5 - 1.0 / (c * h) + one_minus_E / (c * h) ** 2

    def describe(self) -> str:
        solver = f"{self.algorithm_type} order {self.order}" + (f" ({self.solver_type})" if self.order == 2 else "")
        return f"{super().describe()}, {solver}, {self.spacing}"


class UniPCSampler(DPMSolverSampler):
    """UniPC, Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models": the data-prediction multistep predictor UniP-p with the corrector UniC-p, on DPM-Solver++'s grid and
    in diffusers' ``UniPCMultistepScheduler`` conventions (``predict_x0=True``).

    With hh = -h (data prediction), hphi_1 = e^{hh} - 1 and B(h) = e^{hh} - 1 (``bh2``) or hh (``bh1``), the
    differences D_k = (m_k - m_0) / r_k of the data predictions at the earlier log-SNRs, r_k = (lambda_k - lambda_s)/h,
    enter with weights a solving R a = g (R_{jk} = r_k^(j-1), g_j = j! hphi_(j+1) / B(h), hphi_(j+1) = hphi_j / hh - 1/j!,
    Zhao et al. section 3):

        UniP-p:  x~_t = sigma_t/sigma_s x_s - alpha_t hphi_1 m_0 - alpha_t B(h) sum_{k<p} a_k D_k    (a = 1/2 at p = 2)
        UniC-p:  x_t^c = the same from x_s with the new point's D_p = x_theta(x~_t, t) - m_0 added (r_p = 1;
                 a = 1/2 at p = 1), its order p + 1.

    The corrector costs no network call: at call i the network's answer at the predicted x~_{t_i} corrects it, and
    the predictor continues from the corrected state (the state returned after a call is the uncorrected
    prediction; the next call corrects it). The warm-up uses the history there is; ``lower_order_final`` tapers the
    order as the steps run out (min(order, steps left), diffusers' rule for UniPC at any step count); the step to
    x_0 is of order 1 and returns the last data prediction, so the last correction does not reach the output.
    """

    controls = (DPMSolverSampler.controls[0], SPACING_CONTROL)

    def __init__(self, process: GaussianDiffusion, num_steps: int | None = 20, order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, spacing: str = "linspace", clip_denoised: bool = False):
        check_choice("sampler solver_type", solver_type, UNIPC_SOLVER_TYPES)
        self._last: tuple | None = None  # (corrected x_s, order) of the last predictor step
        super().__init__(process, num_steps=num_steps, order=order, lower_order_final=lower_order_final,
                         spacing=spacing, clip_denoised=clip_denoised)
        self.solver_type = solver_type

    stochastic = False

    def reset(self) -> None:
        super().reset()
        self._last = None

    def step_order(self, i: int) -> int:
        n = self.nfe
        if i == n - 1:
            return 1
        order = min(self.order, n - i) if self.lower_order_final else self.order
        return min(order, i + 1)

    def _weights(self, h: float, order: int) -> tuple[float, list[float]]:
        """(B(h), [g_1, ..., g_order]) for a step of log-SNR length h."""
        hh = -h
        hphi_1 = math.expm1(hh)
        B_h = math.expm1(hh) if self.solver_type == "bh2" else hh
        g, hphi_k, factorial = [], hphi_1 / hh - 1.0, 1
        for j in range(1, order + 1):
            g.append(hphi_k * factorial / B_h)
            factorial *= j + 1
            hphi_k = hphi_k / hh - 1.0 / factorial
        return B_h, g

    @staticmethod
    def _solve(rks: list[float], g: list[float]) -> list[float]:
        """a with sum_k r_k^(j-1) a_k = g_j, j = 1..len(rks) (a small Vandermonde system, float64)."""
        R = torch.tensor([[r ** j for r in rks] for j in range(len(rks))], dtype=torch.float64)
        return torch.linalg.solve(R, torch.tensor(g[: len(rks)], dtype=torch.float64)).tolist()

    def _update(self, x, i_s: int, i_t: int, history: list, new: object | None, order: int):
        """UniP-order from grid point i_s to i_t (``new`` None) or UniC-order (``new`` = x_theta at i_t)."""
        alpha_t, sigma_t = self._alpha[i_t], self._sigma[i_t]
        sigma_s, lambda_s, lambda_t = self._sigma[i_s], self._lambda[i_s], self._lambda[i_t]
        _, _, m0 = history[-1]
        h = lambda_t - lambda_s
        x_t = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * m0  # = DPM-Solver++1
        if new is None and order == 1:
            return x_t
        past = history[-order:-1][::-1]  # the p - 1 earlier points, latest first
        rks = [(lam - lambda_s) / h for _, lam, _ in past]
        D = [(m - m0) / r for (_, _, m), r in zip(past, rks)]
        B_h, g = self._weights(h, order)
        if new is None:  # UniP: a = 1/2 at order 2 (the paper's code), else R[:p-1, :p-1] a = g[:p-1]
            a = [0.5] if order == 2 else self._solve(rks, g)
            return x_t - (alpha_t * B_h) * sum(ak * Dk for ak, Dk in zip(a, D))
        a = [0.5] if order == 1 else self._solve(rks + [1.0], g)  # UniC: the new point at r = 1
        res = sum((ak * Dk for ak, Dk in zip(a[:-1], D)), a[-1] * (new - m0))
        return x_t - (alpha_t * B_h) * res

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        if i == 0:
            self._history, self._last = [], None
        elif not self._history or self._history[-1][0] != i - 1:
            raise ValueError(f"step index {i} is invalid here: the multistep state holds step "
                             f"{self._history[-1][0] if self._history else 'none'}; take the steps in order "
                             "(0, 1, ...) after reset()")
        m, _ = self.predict_x0_eps(model_output, x, self._alpha[i], self._sigma[i])
        if self._last is not None:  # UniC: correct x~_{t_i} with the network's answer there
            x_prev, last_order = self._last
            x = self._update(x_prev, i - 1, i, self._history, m, last_order)
        self._history = (self._history + [(i, self._lambda[i], m)])[-self.order:]
        order = self.step_order(i)
        self._last = (x, order)
        return StepOutput(self._update(x, i, i + 1, self._history, None, order), m)

    def describe(self) -> str:
        return f"{Sampler.describe(self)}, UniPC order {self.order} ({self.solver_type}), {self.spacing}"
