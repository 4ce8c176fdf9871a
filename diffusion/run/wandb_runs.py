"""Weights & Biases: offline without a login (said once, with the command to sync later), and results appended to a
training run's W&B run at its last training step."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from diffusion.run.jobs import is_rank_zero

log = logging.getLogger("diffusion")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def configure_wandb_mode(cfg: DictConfig) -> None:
    """Without a W&B login, log offline (WANDB_MODE=offline) and say so once, with the command to sync later."""
    uses_wandb = any("WandbLogger" in str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values())
    if not uses_wandb or os.environ.get("WANDB_MODE") or _wandb_logged_in():
        return
    os.environ["WANDB_MODE"] = "offline"
    if is_rank_zero():
        log.info(
            "W&B: no login found, logging offline to %s/wandb (upload later with `wandb sync`; "
            "`wandb login` to log online, or logger=csv)",
            cfg.paths.output_dir,
        )


def last_training_step(run_dir: str | Path) -> int | None:
    """The last global step of a training run: ``metrics.json`` (written when training ends), else the
    ``global_step`` of ``checkpoints/last.ckpt``; None when it has neither."""
    import json

    run_dir = Path(run_dir)
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        from diffusion.sharing.checkpoints import load_file

        return int(load_file(run_dir / "checkpoints" / "last.ckpt", mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - no usable checkpoint either
        return None


#: the x-axis of the training run's W&B charts (Lightning's WandbLogger logs it with every record)
STEP_METRIC = "trainer/global_step"


def log_to_training_run(run_dir: str | Path, metrics: dict | None = None, images: dict[str, Path] | None = None) -> str:
    """Append metrics and images to the W&B run of a training run directory (its ``wandb/*run-<id>``).

    They are logged at the training run's last step (:func:`last_training_step`) on the step axis its charts use,
    ``trainer/global_step``, so that an evaluation or a figure sits at the end of the training curves (W&B's own
    ``_step`` counter starts again at 0 in an offline resumed run). Images keep their file's pixels and get the file
    name as caption. Offline (no login) this writes another ``offline-run-*-<id>`` folder beside the first;
    ``wandb sync`` of both adds them to the same run. Returns the run id.
    """
    import wandb
    import yaml

    run_dir = Path(run_dir)
    runs = sorted(run_dir.glob("wandb/*run-*"), key=lambda p: p.name)
    runs = [p for p in runs if p.is_dir() and p.name != "latest-run"]
    if not runs:
        raise ValueError(f"wandb_run={run_dir} holds no W&B run (no {run_dir}/wandb/*run-*): log with logger=wandb")
    run_id = runs[0].name.rsplit("-", 1)[-1]
    project = "diffusion"
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        cfg = yaml.safe_load(config_file.read_text()) or {}
        project = ((cfg.get("logger") or {}).get("wandb") or {}).get("project") or project
    step = last_training_step(run_dir)
    if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir))
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
    payload = dict(metrics or {})
    for key, path in (images or {}).items():
        payload[key] = wandb.Image(str(path), caption=Path(path).name)
    if step is None:
        log.warning("%s holds neither metrics.json nor checkpoints/last.ckpt: logged without a training step", run_dir)
    else:
        payload[STEP_METRIC] = step
    run.log(payload)
    for key, value in (metrics or {}).items():
        run.summary[key] = value
    run.finish()
    return run_id
