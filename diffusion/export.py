"""Share a model: ``python -m diffusion.export ckpt=PATH format=safetensors|diffusers out=DIR``.

``safetensors`` writes the weights (EMA unless ``ema=false``) as ``DIR/model.safetensors`` (tensors only: loading it
runs nothing) and the model/schedule/process/sampler settings as ``DIR/config.json``; ``ckpt=DIR`` of sample,
evaluate, compare, app, figures and ``diffusion.train init_from=DIR`` read the folder back. ``diffusers`` writes a
``DDPMPipeline`` folder (:mod:`diffusion.sharing.diffusers_bridge`; networks UNet2DModel cannot represent are refused in one
line). The folder is written under a temporary name and renamed into place, and ``out`` must not exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt

log = logging.getLogger("diffusion.export")

FORMATS = ("safetensors", "diffusers")


def export(cfg: DictConfig) -> Path:
    """Check every input, then write the folder; returns it."""
    require_ckpt(cfg)
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format!r} is invalid: allowed values are {', '.join(FORMATS)}")
    if OmegaConf.is_missing(cfg, "out"):
        raise UsageError("out is required: pass out=<a folder to write, which must not exist>")
    out = Path(str(cfg.out)).expanduser()
    if out.exists():
        raise UsageError(f"out={out} already exists: an export never writes over anything; choose another out")
    if not out.parent.is_dir():
        raise UsageError(f"out={out} is invalid: its parent folder {out.parent} does not exist")
    from diffusion.sharing.checkpoints import write_safetensors_folder  # every check above needs no torch
    from diffusion.training.module import DiffusionModule

    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    module.has_ema = bool(cfg.ema and module.has_ema)  # what the folder holds
    if cfg.format == "safetensors":
        write_safetensors_folder(module, out, {"ckpt": str(cfg.ckpt), "ema": module.has_ema})
    else:
        from diffusion.sharing.diffusers_bridge import check_exportable, write_pipeline_folder

        build_or_usage_error("format=diffusers", lambda: check_exportable(dict(module.hparams.model), dict(module.hparams.process),
                                                                               {"clip_denoised": module.sampler.clip_denoised}))
        write_pipeline_folder(module, out)
    log.info("%s (%s weights) exported as %s to %s", cfg.ckpt, "EMA" if module.has_ema else "raw", cfg.format, out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
