"""Sample a trained model: ``python -m diffusion.sample ckpt=PATH sampler=ddim sampler.num_steps=50 n=64 seed=0``.

Loads any checkpoint of this framework without its training config (EMA weights unless ``ema=false``), draws
``n`` images in batches with a progress bar, and writes ``grid.png`` (the images enlarged by an integer factor,
nearest neighbour, to >= 64 px each, white padding; its PNG text holds the settings and ``command``, the line that
draws it again) and ``samples.npz`` (``samples``: the raw uint8 N x H x W x C) into the run's output directory. The
same seed, ``n`` and ``batch_size`` give the same images.

A class-conditional checkpoint (trained with ``data.conditional=true``) draws ``n`` images of each of ``classes``
(``all``, the default, or a list such as ``[3,7]``), one row per class in ``grid.png`` (named by the class), with
classifier-free guidance ``sampler.guidance_scale=w``; ``samples.npz`` then also holds ``labels``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt
from diffusion.run.sampling import check_guidance, chosen_classes, chosen_sampler, draw, resolve_device
from diffusion.sharing.reproduce import grid_settings

if TYPE_CHECKING:  # torch and the module load once the settings that need no checkpoint have passed
    import torch

    from diffusion.training.module import DiffusionModule

log = logging.getLogger("diffusion.sample")


def load_for_sampling(cfg: DictConfig) -> tuple[DiffusionModule, object]:
    """The module (on its device) and the requested sampler; every bad value is a UsageError."""
    from diffusion.training.module import DiffusionModule

    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    sampler = build_or_usage_error("sampler", lambda: chosen_sampler(module, cfg.sampler))
    if cfg.ema and not module.has_ema:
        log.warning("%s holds no EMA weights (trained without the EMA callback): sampling the raw weights", cfg.ckpt)
    return module.to(resolve_device(cfg.device)), sampler


def settings(cfg: DictConfig, module: DiffusionModule, sampler, n: int, classes: torch.Tensor | None) -> dict:
    """What drew a grid (the PNG's text chunks: ``PIL.Image.open(p).text``), as ``diffusion.sample`` options
    (:func:`diffusion.sharing.reproduce.grid_settings`): the sampler's steps, its eta, the guidance of a class-conditional
    model and every sampler setting given, and ``command``, the ``python -m diffusion.sample`` line that draws the
    same pixels (the same ``ckpt=... sampler.num_steps=... seed=... n=... batch_size=...``). ``n``: the images (of
    each of ``classes``, in their grid order, for a class-conditional model)."""
    from diffusion.samplers.registry import sampler_config

    config = OmegaConf.to_container(cfg.sampler, resolve=True)
    own = "_target_" not in config  # no sampler=<name>: the checkpoint's own, with the settings given
    name = getattr(sampler, "name", type(sampler).__name__)
    options = {"num_steps": sampler.num_steps}
    if hasattr(sampler, "eta"):
        options["eta"] = sampler.eta
    if classes is not None:
        options["guidance_scale"], options["guidance_rescale"] = sampler.guidance_scale, sampler.guidance_rescale
    defaults = {} if own else sampler_config(name)  # sampler=<name>: the settings changed from its yaml's
    for key, value in config.items():
        if not key.startswith("_") and value is not None and key not in options and (own or value != defaults.get(key)):
            options[key] = value
    extra = {} if cfg.get("nrow") is None else {"nrow": cfg.nrow}  # the grid's layout
    if cfg.get("trust_checkpoint"):
        extra["trust_checkpoint"] = "true"
    return grid_settings("diffusion.sample", cfg.ckpt, cfg.ema, module.has_ema, name, own, options, cfg.seed, n,
                         cfg.batch_size, sampler.describe(), None if classes is None else classes.tolist(), extra)


def sample(cfg: DictConfig) -> Path:
    require_ckpt(cfg)
    for key in ("n", "batch_size"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1):
            raise UsageError(f"{key}={cfg[key]!r} is invalid: it must be a positive integer")
    out = Path(cfg.paths.output_dir)
    if (out / "samples.npz").exists():
        raise UsageError(f"output directory {out} already holds samples.npz: choose another hydra.run.dir")
    import numpy as np

    from diffusion.plots.grids import class_rows_image, grid_image, save_png, to_uint8

    module, sampler = load_for_sampling(cfg)
    classes = chosen_classes(cfg, module)
    check_guidance(module, sampler, cfg)
    if classes is None:
        n, labels = cfg.n or 64, None
    else:  # n of each class, class by class: one row each
        n_each = cfg.n or 8
        labels = classes.repeat_interleave(n_each)
        n = len(labels)
    images = draw(module, sampler, n, cfg.batch_size, cfg.seed, labels)
    out.mkdir(parents=True, exist_ok=True)
    if labels is None:
        nrow = cfg.nrow or max(1, int(math.sqrt(n)))
        grid = grid_image(images, nrow=nrow)  # enlarged (nearest) to >= 64 px per image
    else:
        names = [module.class_names[k] for k in classes.tolist()]
        grid = class_rows_image(images, n_each, names, f"{sampler.describe()}, seed {cfg.seed}")
    text = settings(cfg, module, sampler, n if labels is None else n_each, classes)
    save_png(grid, out / "grid.png", text)  # what made it, and the command that draws it again, in its text chunks
    arrays = {"samples": to_uint8(images).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez_compressed(out / "samples.npz", **arrays)
    log.info("%d samples (%s, %s weights%s) written to %s", n, sampler.describe(),
             "EMA" if cfg.ema and module.has_ema else "raw",
             "" if labels is None else f", classes {classes.tolist()}", out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
