"""What every forward process offers the rest of the framework, so that nothing outside this package asks which
process a model was trained with (no ``isinstance`` on process kinds):

- ``kind``: its name in the ``process`` group (``gaussian``, ``blur``, ``edm``, ``flow``); a sampler lists the kinds
  it reverses; ``time_name`` (``t``, EDM's ``σ``) labels its time, ``continuous_time`` says whether t is real;
- ``num_timesteps`` (T), ``objective`` (what the network predicts), ``timestep_sampling`` (how training draws t);
- ``q_sample(x0, t, noise)``, ``training_losses(model, x0, t, noise)``, ``sample_timesteps``, ``time_bins``;
- ``sample_prior(shape, generator, device)``: the x_T that sampling starts from;
- ``describe()``: one line for figure titles (what the forward process does to an image).

Every process is built by ``hydra.utils.instantiate`` from ``conf/process/<kind>.yaml`` (``_partial_``) with the
schedule, the image channels and whether the network learns its variance: ``process(schedule=, channels=,
learn_sigma=)``. Options that mean nothing to a process are refused there in one line, never ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.checks import root_cause

__all__ = ["ForwardProcess", "build_process", "randn", "per_image", "MAX_SAMPLING_STEPS"]

#: the most solver steps a continuous-time process (edm, flow) offers: its ``num_timesteps``, the bound the samplers,
#: the app and the comparisons check step counts against (there is no grid of T training steps)
MAX_SAMPLING_STEPS = 1000


def per_image(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One value per image (B,) shaped to broadcast over x (B, C, H, W)."""
    return a.reshape(-1, *((1,) * (x.dim() - 1)))


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (so a seeded draw is the same wherever it is used), then moved to
    ``device`` (default: the generator's, or the CPU)."""
    draw_on = generator.device if generator is not None else torch.device(device or "cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device or draw_on)


class ForwardProcess(nn.Module):
    """Base of the forward processes: an ``nn.Module`` only so that its tables live in buffers (saved in every
    checkpoint, moved with ``.to(device)``)."""

    kind: str = ""
    objective: str = "x0"
    timestep_sampling: str = "uniform"
    #: the name of the process's own time in labels (``t``; EDM's is ``σ``, sigma)
    time_name: str = "t"
    #: whether time is continuous (edm, flow: training draws real t and ``num_timesteps`` only bounds step counts)
    continuous_time: bool = False

    @property
    def num_timesteps(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """t ~ Uniform{0, ..., T-1}."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def time_bins(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Which of n equal parts of the training times each t falls in (the per-quartile losses): (t n) // T."""
        return (t * n) // self.num_timesteps

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> str:
        return self.kind

    def figure_columns(self, columns: int) -> list[tuple[str, torch.Tensor | None]]:
        """The forward figure's columns: (label, the t of ``q_sample`` or None for x_0), evenly spaced from the image
        (the paper's t = 0) to t = T."""
        times = torch.linspace(0, self.num_timesteps, columns).round().long().tolist()
        return [(f"t={t}", None if t == 0 else torch.tensor(t - 1)) for t in times]

    def figure_state(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the forward figure shows at time t (in the image range): q_sample itself."""
        return self.q_sample(x0, t.expand(len(x0)), noise)


def build_process(config: dict | None, schedule, channels: int, learn_sigma: bool = False) -> ForwardProcess:
    """The forward process of ``config`` (``conf/process/<kind>.yaml``; None: the Gaussian one) for a built
    ``schedule``, images of ``channels`` channels and a network that does (not) learn its variance."""
    from hydra.utils import instantiate

    config = config or {"_target_": "diffusion.processes.GaussianDiffusion"}
    try:
        return instantiate({**config, "_partial_": False}, schedule=schedule, channels=channels, learn_sigma=bool(learn_sigma))
    except Exception as exc:  # Hydra wraps the constructor's one-line error: raise that one
        cause = root_cause(exc)
        if cause is exc:
            raise
        raise cause from None
