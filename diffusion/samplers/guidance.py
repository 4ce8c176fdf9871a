"""Classifier-free guidance (Ho & Salimans 2022) for every sampler: the denoiser the sampling loop calls.

A class-conditional network ``net(x, t, y)`` was trained with its labels replaced by a "null" class (index
``num_classes``) at rate ``module.cond_drop_prob``, so it predicts both conditionally and unconditionally. The
guided prediction at scale w is (Ho & Salimans eq. 6, written for eps; w = 1 + their w)

    eps~(x_t, y) = eps(x_t, null) + w (eps(x_t, y) - eps(x_t, null))

w = 1 is the conditional model, w = 0 the unconditional one, w > 1 guides. Every objective's prediction (eps, x0,
v) is an affine function of eps at a fixed input x_t (x0 = (x_t - sigma eps) / alpha, v = alpha eps - sigma x0),
so the same combination of the network's raw outputs is the guided eps converted to that objective: guidance is
applied to the output directly, for any objective and for the blur process's x0 prediction alike. With a learned
variance (2C output channels) only the prediction is guided; the variance channels are the conditional ones, as
in GLIDE. Both branches run in one forward pass (x_t stacked twice, labels then nulls); w = 1 and w = 0 run one.

``guidance_rescale`` (phi, Lin et al. 2023 section 3.4, eqs. 15-18; diffusers' ``rescale_noise_cfg``): the guided
output is rescaled to the conditional output's standard deviation per image, and mixed with the unrescaled one:
phi * x_cfg * std(x_cond) / std(x_cfg) + (1 - phi) * x_cfg; it counters the over-saturation of large w.
"""

from __future__ import annotations

import math

import torch

#: the options every sampler takes (``sampler.guidance_scale=...``), set by the registry's build_sampler
GUIDANCE_OPTIONS = ("guidance_scale", "guidance_rescale")

__all__ = ["GUIDANCE_OPTIONS", "check_guidance", "combine", "rescale", "Guided", "check_labels"]


def check_guidance(guidance_scale, guidance_rescale) -> tuple[float, float]:
    """(w, phi) as floats, or a one-line ValueError naming the bad one."""
    for name, value, high in (("guidance_scale", guidance_scale, None), ("guidance_rescale", guidance_rescale, 1.0)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if not ok or (high is not None and value > high):
            allowed = "a number in [0, 1]" if high is not None else "a number >= 0 (1: conditional, 0: unconditional, > 1: guided)"
            raise ValueError(f"sampler {name}={value!r} is invalid: it must be {allowed}")
    return float(guidance_scale), float(guidance_rescale)


def rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 eqs. 16-18: mix ``guided`` rescaled to ``cond``'s per-image standard deviation with itself."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0,
            channels: int | None = None) -> torch.Tensor:
    """The guided output from the conditional and unconditional outputs: uncond + w (cond - uncond) on the first
    ``channels`` channels (all by default; the prediction of a learned-variance output), the rest from ``cond``."""
    c = cond.shape[1] if channels is None else channels
    guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
    if guidance_rescale > 0:
        guided = rescale(guided, cond[:, :c], guidance_rescale)
    return guided if c == cond.shape[1] else torch.cat([guided, cond[:, c:]], dim=1)


def check_labels(labels, num_classes: int | None, setting: str = "classes") -> torch.Tensor:
    """``labels`` as a long tensor, or a one-line ValueError: a class outside 0..num_classes-1, or any class for an
    unconditional model (``num_classes`` None)."""
    labels = torch.as_tensor(labels)
    shown = labels.tolist()
    if num_classes is None:
        raise ValueError(f"{setting}={shown} is invalid: this model is unconditional (trained without "
                         "data.conditional=true); sample it without classes")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"{setting}={shown} is invalid: it must be a list of class indices in 0..{num_classes - 1}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"{setting}={shown} is invalid: class {int(bad[0])} is not in 0..{num_classes - 1} "
                         f"(this model has {num_classes} classes)")
    return labels.long()


class Guided:
    """The denoiser ``(x, t) -> output`` of a conditional network for ``labels`` (B,) at guidance scale w.

    ``null_label`` (default: the network's ``num_classes``) is the class the network was trained to read as "no
    class"."""

    def __init__(self, network, labels: torch.Tensor, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 null_label: int | None = None):
        self.network = network
        self.labels = labels
        self.guidance_scale, self.guidance_rescale = check_guidance(guidance_scale, guidance_rescale)
        self.null_label = getattr(network, "num_classes", None) if null_label is None else null_label
        if self.null_label is None:
            raise ValueError("classifier-free guidance needs a class-conditional network (model.num_classes)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(x.device)
        w = self.guidance_scale
        if w == 1.0:  # the conditional model, exactly
            return self.network(x, t, labels)
        nulls = torch.full_like(labels, self.null_label)
        if w == 0.0:  # the unconditional model, exactly
            return self.network(x, t, nulls)
        out = self.network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, nulls]))
        cond, uncond = out.chunk(2)
        return combine(cond, uncond, w, self.guidance_rescale, channels=x.shape[1])
