"""What the network predicts, and the conversions between its three targets: one named function each.

With x_t = alpha x_0 + sigma eps, alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) (Ho et al. eq. 4) and
v = alpha eps - sigma x_0 (Salimans & Ho 2022, section 4), every target gives the other two. ``alpha`` and
``sigma`` are floats or tensors that broadcast against x (per-example coefficients are (B, 1, 1, 1)).
"""

from __future__ import annotations

import torch

OBJECTIVES = ("eps", "x0", "v")

__all__ = ["OBJECTIVES", "x0_from_eps", "eps_from_x0", "x0_from_v", "eps_from_v", "v_from_x0_eps", "to_x0_eps",
           "target_from_x0_eps"]


def x0_from_eps(xt: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x_0 = (x_t - sigma eps) / alpha (inverting Ho et al. eq. 4; DDIM's "predicted x_0", Song et al. eq. 12)."""
    return (xt - sigma * eps) / alpha


def eps_from_x0(xt: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = (x_t - alpha x_0) / sigma."""
    return (xt - alpha * x0) / sigma


def x0_from_v(xt: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x_0 = alpha x_t - sigma v (with alpha^2 + sigma^2 = 1)."""
    return alpha * xt - sigma * v


def eps_from_v(xt: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = sigma x_t + alpha v (with alpha^2 + sigma^2 = 1)."""
    return sigma * xt + alpha * v


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022)."""
    return alpha * eps - sigma * x0


def to_x0_eps(objective: str, output: torch.Tensor, xt: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x_0, predicted eps) from a network's prediction under ``objective``."""
    if objective == "eps":
        return x0_from_eps(xt, output, alpha, sigma), output
    if objective == "x0":
        return output, eps_from_x0(xt, output, alpha, sigma)
    if objective == "v":
        return x0_from_v(xt, output, alpha, sigma), eps_from_v(xt, output, alpha, sigma)
    raise ValueError(f"objective={objective!r} is invalid: allowed values are {', '.join(OBJECTIVES)}")


def target_from_x0_eps(objective: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What a network trained on ``objective`` should output for (x_0, eps) at (alpha, sigma)."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    return v_from_x0_eps(x0, eps, alpha, sigma)
