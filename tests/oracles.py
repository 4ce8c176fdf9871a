"""Models whose optimal noise prediction is known in closed form, for testing the process and samplers.

Both take integer timesteps or fractional ones (the Karras samplers call the network at the t of a sigma between
the schedule's): alpha_bar at t comes from :meth:`GaussianDiffusion.alphas_cumprod_at`.
"""

import torch

from diffusion.processes.gaussian import GaussianDiffusion


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], *((1,) * (x.dim() - 1)))


class PointOracle:
    """Data is a single known x0: the true noise is (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

    It answers in the process's objective (eps, x0 or v), written from the definitions, not from the process's
    own conversions; ``var_values`` appends that constant as a learned-variance output."""

    def __init__(self, process: GaussianDiffusion, x0: torch.Tensor, var_values: float | None = None):
        self.process, self.x0, self.calls, self.var_values = process, x0, 0, var_values

    def __call__(self, x, t):
        self.calls += 1
        p = self.process
        abar = _bcast(p.alphas_cumprod_at(t), x)
        sa, s1m = abar.sqrt(), (1 - abar).sqrt()
        eps = (x - sa * self.x0) / s1m
        out = {"eps": eps, "x0": self.x0.expand_as(x), "v": sa * eps - s1m * self.x0}[p.objective]
        if self.var_values is not None:
            out = torch.cat([out, torch.full_like(out, self.var_values)], dim=1)
        return out


class GaussianOracle:
    """Data ~ N(mu, s^2 I): E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), answered in
    the process's objective (x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), v = sqrt(abar) eps - sqrt(1 - abar) x_0).

    The exact probability-flow ODE solution from x_T is known too (:meth:`ode_solution`), for convergence orders."""

    def __init__(self, process: GaussianDiffusion, mu: float, s: float):
        self.process, self.mu, self.s, self.calls = process, mu, s, 0

    def __call__(self, x, t):
        self.calls += 1
        abar = _bcast(self.process.alphas_cumprod_at(t), x).double()
        xd = x.double()
        eps = (1 - abar).sqrt() * (xd - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)
        objective = self.process.objective
        if objective == "eps":
            return eps.to(x.dtype)
        x0 = (xd - (1 - abar).sqrt() * eps) / abar.sqrt()
        return (x0 if objective == "x0" else abar.sqrt() * eps - (1 - abar).sqrt() * x0).to(x.dtype)

    def ode_solution(self, x_T: torch.Tensor, abar_T: float, abar_0: float = 1.0) -> torch.Tensor:
        """Where the probability-flow ODE takes x_T (at alpha_bar = ``abar_T``) at alpha_bar = ``abar_0``.

        The marginal at alpha_bar is N(sqrt(a) mu, a s^2 + 1 - a), and the ODE's flow is the monotone map between
        marginals: x_0 = sqrt(a_0) mu + sqrt(a_0 s^2 + 1 - a_0) (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T)."""
        a_T, a_0, mu, s2 = abar_T, abar_0, self.mu, self.s**2
        z = (x_T.double() - a_T**0.5 * mu) / (a_T * s2 + 1 - a_T) ** 0.5
        return a_0**0.5 * mu + (a_0 * s2 + 1 - a_0) ** 0.5 * z
