"""Sample a trained model: ``python -m diffusion.sample ckpt=PATH sampler=ddim sampler.num_steps=50 n=64 seed=0``.

Loads any checkpoint of this framework without its training config (EMA weights unless ``ema=false``), draws
``n`` images in batches with a progress bar, and writes ``grid.png`` (the images enlarged by an integer factor,
nearest neighbour, to >= 64 px each, white padding) and ``samples.npz`` (``samples``: the raw uint8 N x H x W x C)
into the run's output directory. The same seed, ``n`` and ``batch_size`` give the same images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion.grids import grid_image
from diffusion.module import DiffusionModule, to_uint8
from diffusion.runtime import CONFIG_DIR, UsageError, build_or_usage_error, exits_on_usage_error, require_ckpt

log = logging.getLogger("diffusion.sample")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_sampling(cfg: DictConfig) -> tuple[DiffusionModule, object]:
    """The module (on its device) and the requested sampler; every bad value is a UsageError."""
    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema))
    sampler = build_or_usage_error("sampler", lambda: chosen_sampler(module, cfg.sampler))
    if cfg.ema and not module.has_ema:
        log.warning("%s holds no EMA weights (trained without the EMA callback): sampling the raw weights", cfg.ckpt)
    return module.to(resolve_device(cfg.device)), sampler


def chosen_sampler(module: DiffusionModule, config: DictConfig):
    """``sampler=<name>`` (a config with ``_target_``) as configured; otherwise the checkpoint's own sampler with the
    settings given (``sampler.num_steps=20``; null ones keep the checkpoint's)."""
    config = OmegaConf.to_container(config, resolve=True)
    if "_target_" in config:
        return module.build_sampler(config)
    return module.build_sampler(dict(module.hparams.sampler), **{k: v for k, v in config.items() if v is not None})


def draw(module: DiffusionModule, sampler, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """``n`` images in [-1, 1] on the CPU, batch by batch, from one generator seeded with ``seed``."""
    generator = torch.Generator(device=module.device).manual_seed(seed)
    batches = []
    for start in tqdm(range(0, n, batch_size), desc=f"sampling {n} images", unit="batch"):
        size = min(batch_size, n - start)
        batches.append(module.sample(size, sampler=sampler, generator=generator, progress=True).samples.cpu())
    return torch.cat(batches)


def sample(cfg: DictConfig) -> Path:
    require_ckpt(cfg)
    for key in ("n", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UsageError(f"{key}={cfg[key]!r} is invalid: it must be a positive integer")
    out = Path(cfg.paths.output_dir)
    if (out / "samples.npz").exists():
        raise UsageError(f"output directory {out} already holds samples.npz: choose another hydra.run.dir")
    module, sampler = load_for_sampling(cfg)
    images = draw(module, sampler, cfg.n, cfg.batch_size, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    nrow = cfg.nrow or max(1, int(math.sqrt(cfg.n)))
    grid_image(images, nrow=nrow).save(out / "grid.png")  # enlarged (nearest) to >= 64 px per image
    np.savez_compressed(out / "samples.npz", samples=to_uint8(images).permute(0, 2, 3, 1).numpy())
    log.info("%d samples (%s, %s weights) written to %s", cfg.n, sampler.describe(),
             "EMA" if cfg.ema and module.has_ema else "raw", out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
