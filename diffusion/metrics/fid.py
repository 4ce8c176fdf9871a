"""FID and KID with torchmetrics, on uint8 images, with a local Inception weights file (no download at run time).

The Inception network is torch-fidelity's port of the TF FID Inception (``pip install -e ".[metrics]"``). Images
are resized inside it without antialiasing, as the reference implementation does, so numbers are comparable with
published FIDs. Any ``nn.Module`` mapping uint8 (N, 3, H, W) images to (N, F) features can replace it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_weights(path: str | None = None) -> str:
    """The local Inception weights: ``path``, else $DIFFUSION_INCEPTION_WEIGHTS, else torch hub's cache."""
    candidates = [path, os.environ.get("DIFFUSION_INCEPTION_WEIGHTS"), str(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    given = f" (fid.weights={path} does not exist)" if path else ""
    raise ValueError(
        f"FID/KID need the Inception weights file {INCEPTION_FILE}{given}: download {INCEPTION_URL} on a machine with "
        "internet and pass fid.weights=<path> (or set DIFFUSION_INCEPTION_WEIGHTS)"
    )


def inception(weights_path: str) -> nn.Module:
    """torch-fidelity's FID Inception with the weights file ``weights_path``; ValueError naming what is missing."""
    import importlib.util

    # torchmetrics imports without torch-fidelity and only fails when the network is built: ask first
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(f"fid.weights={weights_path} needs torch-fidelity for the Inception network, and it is not "
                         'installed: pip install -e ".[metrics]" (or pass fid.feature_extractor=<an nn.Module _target_>)')
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path,
                                  antialias=False)
    except Exception as exc:  # noqa: BLE001 - a wrong or damaged weights file: one line naming it
        raise ValueError(f"fid.weights={weights_path} is not the Inception weights file {INCEPTION_FILE} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): download {INCEPTION_URL}") from exc


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.inference_mode()
def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature: nn.Module,
    metrics=("fid", "kid"),
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_real: int | None = None,
    num_fake: int | None = None,
) -> dict:
    """FID and/or KID between two uint8 (N, C, H, W) image sets; KID's subset size never exceeds either set.

    Under DDP each rank passes its own shard and ``num_real``/``num_fake``, the sizes of the whole sets: every rank
    updates its metric states and every rank computes, torchmetrics summing (FID) or gathering (KID) the states
    across ranks, so all ranks return the value of the whole sets.
    """
    num_real = len(real) if num_real is None else num_real
    num_fake = len(fake) if num_fake is None else num_fake
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out: dict = {}
    chosen = {}
    if "fid" in metrics:
        chosen["fid"] = FrechetInceptionDistance(feature=feature, reset_real_features=True)
    if "kid" in metrics:
        subset = min(kid_subset_size, num_real, num_fake)
        chosen["kid"] = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=subset)
        out["kid_subset_size"] = subset
    for metric in chosen.values():
        metric.to(device)
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                metric.update(_rgb(images[start : start + batch_size]).to(device), real=is_real)
    if "fid" in chosen:
        out["fid"] = float(chosen["fid"].compute())
    if "kid" in chosen:
        mean, std = chosen["kid"].compute()
        out["kid"], out["kid_std"] = float(mean), float(std)
    out["num_real"], out["num_fake"] = num_real, num_fake
    return out
