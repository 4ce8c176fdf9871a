"""The one list of samplers: the files of ``conf/sampler/``. A sampler is its class (one file of this package) plus
``conf/sampler/<name>.yaml`` (its ``_target_`` and defaults); the train, sample, evaluate, compare, figures CLIs
and the app all read this list, so adding a sampler edits nothing else.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from diffusion.samplers.controls import GUIDANCE_CONTROLS, Control

SAMPLER_DIR = Path(__file__).resolve().parents[2] / "conf" / "sampler"

__all__ = ["sampler_names", "sampler_config", "sampler_class", "sampler_name", "build_sampler", "sampler_controls",
           "GUIDANCE_CONTROLS"]


@lru_cache(maxsize=1)
def _configs() -> dict[str, dict]:
    import yaml

    return {f.stem: yaml.safe_load(f.read_text()) for f in sorted(SAMPLER_DIR.glob("*.yaml"))}


def sampler_class(name: str) -> type:  # a Sampler subclass (base.py is not imported here: it imports this)
    from hydra.utils import get_class

    return get_class(sampler_config(name)["_target_"])


def sampler_names(kind: str | None = None) -> list[str]:
    """Every sampler's name, or those that reverse the process ``kind`` (``gaussian``, ``blur``)."""
    return [name for name in _configs() if kind is None or kind in sampler_class(name).reverses]


def sampler_config(name: str, **overrides: Any) -> dict:
    """The config of sampler ``name`` with ``overrides`` (None values are left at the file's default)."""
    configs = _configs()
    if name not in configs:
        raise ValueError(f"sampler={name!r} is invalid: allowed values are {', '.join(configs)}")
    config = dict(configs[name])
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    return config


def sampler_name(config: dict) -> str:
    """The registry name of a sampler config (a checkpoint's, say), from its ``_target_``."""
    target = config.get("_target_")
    for name, cfg in _configs().items():
        if cfg["_target_"] == target:
            return name
    return str(target).rsplit(".", 1)[-1]


def sampler_controls(name: str, conditional: bool = False) -> tuple[Control, ...]:
    """The options of sampler ``name`` a person tunes by hand (its class's ``controls``), and the guidance controls
    for a class-conditional model: the sampling page draws one widget per control."""
    return sampler_class(name).controls + (GUIDANCE_CONTROLS if conditional else ())


def build_sampler(config: dict | str, process, **overrides: Any):
    """Instantiate a sampler (a name, or a config with ``_target_``) for ``process``, with ``overrides``.

    Options a sampler does not take are refused in one line naming the sampler and what it takes; every sampler
    takes the classifier-free guidance options (``guidance_scale``, ``guidance_rescale``: :mod:`.guidance`)."""
    import inspect

    from hydra.utils import get_class

    from diffusion.samplers.guidance import GUIDANCE_OPTIONS, check_guidance

    if isinstance(config, str):
        config = sampler_config(config)
    config = {**config, **overrides}
    cls = get_class(config["_target_"])
    options = {k: v for k, v in config.items() if not k.startswith("_")}
    guidance = {k: options.pop(k) for k in GUIDANCE_OPTIONS if k in options}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "process")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {sampler_name(config)} has no option {unknown[0]!r}: it takes "
                         f"{', '.join(allowed + list(GUIDANCE_OPTIONS))}")
    scale, phi = check_guidance(guidance.get("guidance_scale", 1.0), guidance.get("guidance_rescale", 0.0))
    sampler = cls(process, **options)
    sampler.name = sampler_name(config)
    sampler.guidance_scale, sampler.guidance_rescale = scale, phi
    return sampler
