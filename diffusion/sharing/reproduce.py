"""What drew a grid of samples, as the PNG text chunks of ``diffusion.sample``'s ``grid.png`` and the sampling page's
downloads (``PIL.Image.open(path).text``): the settings as ``diffusion.sample`` options, and ``command``, the
``python -m diffusion.sample ...`` line that draws the same images again. Torch-free.
"""

from __future__ import annotations

import shlex
from typing import Iterable

#: the sampler settings ``conf/sample.yaml`` gives the checkpoint's own sampler (any other one is set with ``+``)
OWN_SAMPLER_KEYS = ("num_steps", "guidance_scale", "guidance_rescale")


def sample_command(ckpt: str, sampler: str, own: bool, options: dict, seed: int, n: int, batch_size: int,
                   classes: Iterable[int] | None = None, ema: bool = True, extra: dict | None = None) -> str:
    """The ``python -m diffusion.sample`` command that draws these images: the checkpoint's own sampler (``own``)
    or ``sampler=<name>``, with ``options`` (``{"num_steps": 50, "eta": 0.0}``), ``n`` images (of each of
    ``classes``) in batches of ``batch_size`` from ``seed``, the raw weights unless ``ema``; ``extra``: more
    overrides (``{"nrow": 4}``)."""
    args = ["python", "-m", "diffusion.sample", f"ckpt={ckpt}"] + ([] if own else [f"sampler={sampler}"])
    if own:
        given = set(OWN_SAMPLER_KEYS)
    else:
        from diffusion.samplers.registry import sampler_config

        given = set(sampler_config(sampler))
    for key, value in options.items():  # a setting the sampler's config does not hold is added with +
        args.append(f"{'' if key in given else '+'}sampler.{key}={value}")
    args += [f"seed={seed}", f"n={n}", f"batch_size={batch_size}"]
    if classes is not None:
        args.append(f"classes=[{','.join(map(str, classes))}]")
    if not ema:
        args.append("ema=false")
    args += [f"{key}={value}" for key, value in (extra or {}).items()]
    return shlex.join(args)


def grid_settings(software: str, ckpt: str, ema: bool, has_ema: bool, sampler: str, own: bool, options: dict,
                  seed: int, n: int, batch_size: int, description: str, classes: Iterable[int] | None = None,
                  extra: dict | None = None) -> dict:
    """A grid's PNG text: who wrote it (``Software``), ``ckpt``, the ``weights`` drawn (EMA or raw), ``sampler``
    and each ``sampler.<option>``, ``seed``, ``n`` (of each class), ``batch_size``, the sampler's ``description``,
    ``classes`` for a class-conditional model, and the :func:`sample_command` that draws the same images."""
    classes = None if classes is None else [int(k) for k in classes]
    text = {"Software": software, "ckpt": str(ckpt), "weights": "EMA" if ema and has_ema else "raw",
            "sampler": sampler, **{f"sampler.{k}": v for k, v in options.items()}, "seed": seed, "n": n,
            "batch_size": batch_size, "description": description}
    if classes is not None:
        text["classes"] = str(classes)
    text["command"] = sample_command(ckpt, sampler, own, options, seed, n, batch_size, classes, ema, extra)
    return text
