"""What the CLIs that draw from a checkpoint share (sample, evaluate, compare, figures, the app): the device, the
sampler and the classes a configuration asks for, each refused in one line, and the batched draw with progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from diffusion.run.errors import UsageError, build_or_usage_error

if TYPE_CHECKING:  # torch and the module load once the settings that need no checkpoint have passed
    import torch

    from diffusion.training.module import DiffusionModule


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def chosen_sampler(module: DiffusionModule, config: DictConfig):
    """``sampler=<name>`` (a config with ``_target_``) as configured; otherwise the checkpoint's own sampler with the
    settings given (``sampler.num_steps=20``; null ones keep the checkpoint's)."""
    config = OmegaConf.to_container(config, resolve=True)
    if "_target_" in config:
        return module.build_sampler(config)
    return module.build_sampler(dict(module.hparams.sampler), **{k: v for k, v in config.items() if v is not None})


def draw(module: DiffusionModule, sampler, n: int, batch_size: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` images in [-1, 1] on the CPU, batch by batch, from one generator seeded with ``seed``; ``labels`` (n,):
    their classes (a class-conditional model)."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator(device=module.device).manual_seed(seed)
    batches = []
    for start in tqdm(range(0, n, batch_size), desc=f"sampling {n} images", unit="batch"):
        size = min(batch_size, n - start)
        part = None if labels is None else labels[start : start + size]
        batches.append(module.sample(size, sampler=sampler, generator=generator, progress=True, labels=part).samples.cpu())
    return torch.cat(batches)


def chosen_classes(cfg: DictConfig, module: DiffusionModule) -> torch.Tensor | None:
    """The ``classes`` to draw (``all`` or null: every class of a class-conditional model; a list), None for an
    unconditional model; a UsageError for classes it does not have, or guidance without classes."""
    import torch

    from diffusion.samplers.guidance import check_labels

    classes = cfg.get("classes")
    if module.num_classes is None:
        if classes is not None:
            raise UsageError(f"classes={classes} is invalid for ckpt={cfg.ckpt}: the model is unconditional (trained "
                             "without data.conditional=true); leave classes unset")
        return None
    if classes is None or classes == "all":
        return torch.arange(module.num_classes)
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    if isinstance(classes, str) or not classes:
        raise UsageError(f"classes={classes!r} is invalid: it must be all or a list of class indices in "
                         f"0..{module.num_classes - 1} (e.g. classes=[3,7])")
    return build_or_usage_error("classes", lambda: check_labels(list(classes), module.num_classes))


def check_guidance(module: DiffusionModule, sampler, cfg: DictConfig) -> None:
    if sampler.guidance_scale != 1.0 and module.num_classes is None:
        raise UsageError(f"sampler.guidance_scale={sampler.guidance_scale:g} is invalid for ckpt={cfg.ckpt}: the model "
                         "is unconditional (trained without data.conditional=true), so there is nothing to guide")
