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


class ClassGaussianOracle:
    """A class-conditional network with exact answers: class k's data ~ N(mu_k, s^2 I) (the ``mus``, equally likely),
    called as ``net(x, t, y)``; ``y = len(mus)`` (the null class) answers for the whole mixture. Under the mixture,
    x_t given class k is N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I), so E[eps | x_t] = sum_k r_k(x_t) E[eps | x_t, k]
    with r_k the posterior class probabilities (a softmax of the Gaussian log-likelihoods over all dimensions).
    ``num_classes`` is ``len(mus)``, as a conditional UNet's; every call records its labels in ``seen``."""

    def __init__(self, process: GaussianDiffusion, mus: list[float], s: float):
        self.process, self.mus, self.s = process, [float(m) for m in mus], s
        self.num_classes, self.calls, self.seen = len(mus), 0, []
        self.per_class = [GaussianOracle(process, m, s) for m in self.mus]

    def posterior(self, x, t) -> torch.Tensor:
        """(B, K): p(class k | x_t) under equal priors."""
        abar = _bcast(self.process.alphas_cumprod_at(t), x).double()
        var = abar * self.s**2 + 1 - abar
        xd = x.double()
        logp = torch.stack([-((xd - abar.sqrt() * m) ** 2 / (2 * var)).flatten(1).sum(1) for m in self.mus], dim=1)
        return logp.softmax(dim=1)

    def __call__(self, x, t, y=None):
        self.calls += 1
        y = torch.full((x.shape[0],), self.num_classes) if y is None else y.cpu()
        self.seen.append(y.clone())
        answers = torch.stack([oracle(x, t).double() for oracle in self.per_class])  # (K, B, ...)
        r = self.posterior(x, t).T.reshape(self.num_classes, x.shape[0], *((1,) * (x.dim() - 1)))
        mixture = (r * answers).sum(0)  # eps, x0 and v are all affine in eps: the mixture's answer in any objective
        out = torch.where(_bcast(y == self.num_classes, x), mixture, answers[y.clamp(max=self.num_classes - 1), torch.arange(x.shape[0])])
        return out.to(x.dtype)


class EDMGaussianOracle:
    """Data ~ N(mu, s^2 I) under EDM's x = x_0 + sigma eps: the exact denoiser is E[x_0 | x] = mu + s^2 / (s^2 +
    sigma^2) (x - mu). Called as the raw network F(c_in x, c_noise) of an EDM process, it recovers sigma = exp(4 c_noise)
    and x = input / c_in from Karras et al.'s Table 1 (written here from the paper, not from the process's own
    functions) and answers F = (D - c_skip x) / c_out, so that the preconditioned D is the exact one."""

    def __init__(self, sigma_data: float, mu: float, s: float):
        self.sd, self.mu, self.s, self.calls = sigma_data, mu, s, 0

    def denoiser(self, x, sigma):
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def __call__(self, x_in, c_noise):
        self.calls += 1
        sigma = _bcast(torch.exp(4 * c_noise.double()), x_in)
        sd2 = self.sd**2
        x = x_in.double() * (sigma**2 + sd2).sqrt()  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.sd / (sigma**2 + sd2).sqrt()
        return ((self.denoiser(x, sigma) - c_skip * x) / c_out).to(x_in.dtype)

    def ode_solution(self, x, sigma_from: float, sigma_to: float):
        """The probability-flow ODE's map between marginals N(mu, s^2 + sigma^2): x at sigma_from -> at sigma_to."""
        s2 = self.s**2
        return self.mu + ((s2 + sigma_to**2) / (s2 + sigma_from**2)) ** 0.5 * (x.double() - self.mu)


class FlowGaussianOracle:
    """Data ~ N(mu, s^2 I) on the flow path x_t = (1 - t) x_0 + t eps: with a = 1 - t, b = t, x_t ~ N(a mu, a^2 s^2 +
    b^2) and E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2), E[eps | x_t] = (x_t - a E[x_0 | x_t]) / b.
    Called as the network at 1000 t, it answers in ``objective`` (v = eps - x_0, x0 or eps)."""

    def __init__(self, objective: str, mu: float, s: float):
        self.objective, self.mu, self.s, self.calls = objective, mu, s, 0

    def answers(self, x, t):
        a, b = 1 - t, t
        x0 = self.mu + a * self.s**2 * (x - a * self.mu) / (a**2 * self.s**2 + b**2)
        eps = (x - a * x0) / b
        return x0, eps

    def __call__(self, x, timestep):
        self.calls += 1
        t = _bcast(timestep.double() / 1000, x)
        x0, eps = self.answers(x.double(), t)
        return {"v": eps - x0, "x0": x0, "eps": eps}[self.objective].to(x.dtype)

    def ode_solution(self, x, t_from: float, t_to: float):
        """The ODE's monotone map between the marginals N((1 - t) mu, (1 - t)^2 s^2 + t^2)."""
        var = lambda t: (1 - t) ** 2 * self.s**2 + t**2  # noqa: E731
        return (1 - t_to) * self.mu + (var(t_to) / var(t_from)) ** 0.5 * (x.double() - (1 - t_from) * self.mu)
