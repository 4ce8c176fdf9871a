"""Models whose optimal noise prediction is known in closed form, for testing the process and samplers."""

import torch

from diffusion.process import GaussianDiffusion, extract


class PointOracle:
    """Data is a single known x0: the true noise is (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, process: GaussianDiffusion, x0: torch.Tensor):
        self.process, self.x0, self.calls = process, x0, 0

    def __call__(self, x, t):
        self.calls += 1
        p = self.process
        return (x - extract(p.sqrt_alphas_cumprod, t, x.shape) * self.x0) / extract(
            p.sqrt_one_minus_alphas_cumprod, t, x.shape
        )


class GaussianOracle:
    """Data ~ N(mu, s^2 I): E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def __init__(self, process: GaussianDiffusion, mu: float, s: float):
        self.process, self.mu, self.s = process, mu, s

    def __call__(self, x, t):
        abar = extract(self.process.alphas_cumprod, t, x.shape).double()
        eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)
        return eps.to(x.dtype)
