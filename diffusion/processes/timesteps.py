"""How training draws its timesteps: uniformly (Ho et al.), or by importance (Nichol & Dhariwal 2021, section 3.3).

L_vlb = sum_t L_t has terms of very different sizes (the first few dominate), so a uniform draw of t makes its
one-sample estimate T L_t noisy. Importance sampling draws t with p_t proportional to sqrt(E[L_t^2]), estimated
from the last ``history`` losses of each t, and weights the loss by 1 / (T p_t), which keeps the estimate of the
uniform average unbiased while lowering its variance. Until every t has ``history`` losses it draws uniformly.
This is improved-diffusion's ``LossSecondMomentResampler``; it is meant for ``loss_type=vlb``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.checks import check_choice

TIMESTEP_SAMPLINGS = ("uniform", "importance")

__all__ = ["LossSecondMomentSampler", "TIMESTEP_SAMPLINGS", "build_timestep_sampler"]


class LossSecondMomentSampler(nn.Module):
    """p_t = (1 - uniform_prob) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + uniform_prob / T, from a history of losses.

    The history is kept in float buffers (saved in checkpoints, so a resumed run keeps its estimate).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__()
        self.num_timesteps, self.history, self.uniform_prob = int(num_timesteps), int(history), float(uniform_prob)
        self.register_buffer("loss_history", torch.zeros(num_timesteps, history))
        self.register_buffer("loss_counts", torch.zeros(num_timesteps))

    @property
    def warmed_up(self) -> bool:
        return bool((self.loss_counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t over the T timesteps (uniform until every t has a full history)."""
        T = self.num_timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, device=self.loss_history.device)
        p = self.loss_history.double().square().mean(1).sqrt()
        p = p / p.sum()
        return ((1 - self.uniform_prob) * p + self.uniform_prob / T).float()

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights): t ~ p and the loss weights 1 / (T p_t)."""
        p = self.probabilities()
        gen_device = generator.device if generator is not None else p.device
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator).to(device)
        weights = 1.0 / (self.num_timesteps * p.to(device)[t])
        return t, weights

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each example's (unweighted) loss to its timestep's history, dropping the oldest once full."""
        history, counts = self.loss_history.cpu(), self.loss_counts.cpu()
        for step, loss in zip(t.flatten().tolist(), losses.detach().flatten().float().tolist()):
            n = int(counts[step])
            if n < self.history:
                history[step, n] = loss
                counts[step] = n + 1
            else:
                history[step, :-1] = history[step, 1:].clone()
                history[step, -1] = loss
        self.loss_history.copy_(history)
        self.loss_counts.copy_(counts)


def build_timestep_sampler(kind: str, num_timesteps: int) -> LossSecondMomentSampler | None:
    """None for ``uniform`` (the process draws t itself), the resampler for ``importance``."""
    kind = check_choice("timestep_sampling", kind, TIMESTEP_SAMPLINGS)
    return LossSecondMomentSampler(num_timesteps) if kind == "importance" else None
