"""Nothing a user had is lost: output folders checked before Hydra creates them, checkpoints a previous run left
refused (a requeued SLURM job continues its own), files written atomically, checkpoints required where read."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion.run.errors import UsageError
from diffusion.run.jobs import is_rank_zero

log = logging.getLogger("diffusion")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_resume_and_outputs(cfg: DictConfig) -> Path | None:
    """Refuse a missing checkpoint, and refuse to write over checkpoints a previous run left in the output dir,
    except in a requeued SLURM job: when the directory's ``last.ckpt`` was written by this very job (it records
    ``slurm_job_id``) and SLURM has restarted it, ``ckpt_path`` becomes that file and the run continues there.
    Returns that file (a requeued run), else None."""
    from diffusion.run import cluster, requeue

    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise UsageError(f"ckpt_path={ckpt} does not exist or is not a file")
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        if cluster.slurm_job_id() and cluster.slurm_restart_count() >= 1 and is_rank_zero():
            log.warning("SLURM job %s was requeued (restart %d) but its run directory %s holds no checkpoint: "
                        "training starts from the beginning (the run directory must not depend on the start time: "
                        "hydra.run.dir=<one per job>)", cluster.slurm_job_id(), cluster.slurm_restart_count(),
                        cfg.paths.output_dir)
        return None
    own, why_not = requeue.own_last_checkpoint(ckpt_dir)  # every rank: they all resume from it
    if own is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.ckpt_path = str(own)
        if is_rank_zero():
            instead = f" (not ckpt_path={ckpt})" if ckpt not in (None, str(own)) else ""
            log.info("requeued SLURM job %s (restart %d): resuming from %s%s", cluster.slurm_job_id(),
                     cluster.slurm_restart_count(), own, instead)
        return own
    if is_rank_zero():
        raise UsageError(
            f"output directory {cfg.paths.output_dir} already holds checkpoints: choose another hydra.run.dir "
            "(or none, for a fresh timestamped one); to continue that run pass ckpt_path=<its last.ckpt>"
            + (f" (a requeued SLURM job would continue it by itself, but {why_not})" if why_not else "")
        )
    return None


def unusable_dir_reason(path: str | Path) -> str | None:
    """Why the folder ``path`` could not be created or written (a file on the way, no write permission, a
    read-only file system), or None when it can. Nothing is created. ``os.access`` asks the kernel, so a read-only
    mount counts even for root, who may otherwise write anywhere."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        try:
            if not folder.exists():
                continue
        except OSError as err:
            return f"{folder} cannot be looked at ({err.strerror})"
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable (permission denied or a read-only file system)"
        return None
    return None


class OutputDirCheck(HydraCallback):
    """Hydra creates the run directory before the task starts (a traceback when it cannot): refuse such a
    ``hydra.run.dir`` / ``hydra.sweep.dir`` first, in one line, exit status 2. Enabled in conf/hydra/default.yaml.

    Hydra turns an exception raised by a callback into a warning, so this one exits itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")
        sweep_dir = Path(str(config.hydra.sweep.dir))
        used = [p for p in (sweep_dir / "optimization_results.yaml", *sweep_dir.glob("*/checkpoints/*")) if p.exists()]
        if used:  # each job would refuse its used directory; a search would also overwrite the earlier results
            print(f"error: hydra.sweep.dir={sweep_dir} holds an earlier sweep ({used[0].relative_to(sweep_dir)}): "
                  "choose another hydra.sweep.dir (or none, for a fresh timestamped one)", file=sys.stderr)
            sys.exit(2)

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        value = OmegaConf.select(config, key)
        reason = unusable_dir_reason(str(value)) if value is not None else None
        if reason:
            print(f"error: {key}={value} cannot be used: {reason}; choose a folder this user may create and write",
                  file=sys.stderr)
            sys.exit(2)


def require_ckpt(cfg: DictConfig) -> None:
    """``ckpt`` given, and a file or folder that exists (checked before any heavy import: a typo answers at once)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UsageError("ckpt is required: pass ckpt=<path to a checkpoint written by python -m diffusion.train>")
    if cfg.ckpt is None or not Path(str(cfg.ckpt)).exists():
        raise UsageError(f"ckpt={cfg.ckpt} does not exist: pass a checkpoint written by python -m diffusion.train (or "
                         "a folder python -m diffusion.export wrote)")
