"""Models whose optimal noise prediction is known in closed form, for testing the process and samplers."""

import torch

from diffusion.process import GaussianDiffusion, extract


class PointOracle:
    """Data is a single known x0: the true noise is (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

    It answers in the process's objective (eps, x0 or v), written from the definitions, not from the process's
    own conversions; ``var_values`` appends that constant as a learned-variance output."""

    def __init__(self, process: GaussianDiffusion, x0: torch.Tensor, var_values: float | None = None):
        self.process, self.x0, self.calls, self.var_values = process, x0, 0, var_values

    def __call__(self, x, t):
        self.calls += 1
        p = self.process
        sa, s1m = extract(p.sqrt_alphas_cumprod, t, x.shape), extract(p.sqrt_one_minus_alphas_cumprod, t, x.shape)
        eps = (x - sa * self.x0) / s1m
        out = {"eps": eps, "x0": self.x0.expand_as(x), "v": sa * eps - s1m * self.x0}[p.objective]
        if self.var_values is not None:
            out = torch.cat([out, torch.full_like(out, self.var_values)], dim=1)
        return out


class GaussianOracle:
    """Data ~ N(mu, s^2 I): E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def __init__(self, process: GaussianDiffusion, mu: float, s: float):
        self.process, self.mu, self.s = process, mu, s

    def __call__(self, x, t):
        abar = extract(self.process.alphas_cumprod, t, x.shape).double()
        eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)
        return eps.to(x.dtype)
