"""SLURM preemption and requeue: whether the run directory's last.ckpt is its own (a requeued job
continues it by itself), the ``scontrol requeue`` call, and Lightning's own auto-requeue turned off.

The flow (the signal side lives in :class:`diffusion.training.resumable.ResumableRun`):

1. ``#SBATCH --signal=USR1@90`` (or submitit's ``USR2@90``) warns the job 90 s before its time limit (a preemption
   sends SIGTERM instead: the run saves the same way and exits 143, and a job SLURM requeues resumes as below).
   The run finishes the training step it is in, writes ``checkpoints/last.ckpt`` (which records ``slurm_job_id``),
   and global rank 0 runs ``scontrol requeue <job id>`` (``<array job>_<task>`` for an array task) or, under the
   submitit launcher, hands over to submitit's own handler, which requeues the job the same way; the run exits.
2. SLURM starts the same job again (same job id, ``SLURM_RESTART_COUNT`` >= 1, same command line), which composes
   the same run directory (``DIFFUSION_RUN_STAMP`` follows the job id under SLURM). That directory holds checkpoints,
   which a new run is refused; here its ``last.ckpt`` belongs to this very job, so the run resumes from it
   (``ckpt_path`` becomes that file; the W&B run continues as for any ``ckpt_path=`` resume).
"""

from __future__ import annotations

import csv
import logging
import subprocess
from pathlib import Path

from diffusion.run.cluster import slurm_detected, slurm_job_id, slurm_restart_count

log = logging.getLogger("diffusion.run.requeue")

#: the key under which every checkpoint records the SLURM job that wrote it (:func:`diffusion.run.cluster.slurm_job_id`)
JOB_ID_KEY = "slurm_job_id"


def recorded_job_id(checkpoint: dict | None) -> str | None:
    """The SLURM job id a checkpoint recorded, or None."""
    job = checkpoint.get(JOB_ID_KEY) if isinstance(checkpoint, dict) else None
    return job if isinstance(job, str) and job else None


def own_last_checkpoint(ckpt_dir: str | Path) -> tuple[Path | None, str]:
    """``(last.ckpt, "")`` when ``ckpt_dir/last.ckpt`` was written by this SLURM job and this is a restart of it (a
    requeued job continuing its run); else ``(None, why not)``, the reason a refusal can name ("" outside SLURM)."""
    job = slurm_job_id()
    if job is None:
        return None, ""
    last = Path(ckpt_dir) / "last.ckpt"
    if not last.is_file():
        return None, f"it has no last.ckpt for SLURM job {job} to continue"
    try:
        from diffusion.sharing.checkpoints import load_file

        theirs = recorded_job_id(load_file(last, mmap=True))  # weights-only: the run's own file, read safely
    except Exception as exc:  # noqa: BLE001 - an unreadable file is not this job's checkpoint
        return None, f"its last.ckpt cannot be read ({type(exc).__name__})"
    if theirs != job:
        writer = f"SLURM job {theirs}" if theirs else "a run outside SLURM"
        return None, f"its last.ckpt was written by {writer}, not by this job ({job})"
    if slurm_restart_count() < 1:
        return None, f"its last.ckpt is this job's ({job}) but SLURM_RESTART_COUNT says this is not a requeued start"
    return last, ""


def requeue(job_id: str) -> str | None:
    """``scontrol requeue <job_id>``; None when it worked, else why not (one line)."""
    cmd = ["scontrol", "requeue", job_id]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return "scontrol was not found on PATH"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(cmd)}` failed: {exc}"
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout or "").split())
        return f"`{' '.join(cmd)}` exited with {proc.returncode}" + (f": {detail}" if detail else "")
    return None


def lightning_requeue_off(trainer_cfg) -> dict:
    """Trainer arguments that turn Lightning's own SLURM auto-requeue off; {} outside SLURM.

    Under SLURM Lightning picks its ``SLURMEnvironment``, whose ``auto_requeue=True`` installs a SIGUSR1 handler that
    saves ``hpc_ckpt_<n>.ckpt`` *inside the signal handler*, i.e. in the middle of whatever the process was doing (a
    backward pass, an optimizer step half applied to the EMA, validation with the EMA weights swapped in), marks the
    loggers finished, and requeues; in DDP that save is a collective started by whichever rank got the signal first.
    Lightning also loads the newest ``hpc_ckpt_*.ckpt`` of the run directory by itself whenever ``ckpt_path`` is
    unset, past the run-directory checks. Making that checkpoint exact would mean deferring Lightning's save to a step
    boundary, which its handler cannot do, so this framework uses its own mechanism (``ResumableRun``: the save at the
    next batch boundary, agreed by all ranks, into last.ckpt) and gives Lightning the same environment with
    ``auto_requeue=False``. A ``SLURMEnvironment`` configured in ``trainer.plugins`` is left as configured. Under
    torchrun inside a SLURM job Lightning uses torchrun's environment (its ranks): nothing is forced on it.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not slurm_detected():  # not SLURM, or torchrun inside a SLURM job: Lightning takes torchrun's ranks then
        return {}
    plugins = list(trainer_cfg.get("plugins") or [])
    if any("SLURMEnvironment" in str(p.get("_target_", "")) for p in plugins if hasattr(p, "get")):
        return {}
    target = f"{SLURMEnvironment.__module__}.{SLURMEnvironment.__qualname__}"
    return {"plugins": [*plugins, {"_target_": target, "auto_requeue": False}]}


def continue_csv_logs(loggers: list, step: int) -> None:
    """A requeued job logs into its run's ``csv/metrics.csv`` again, which Lightning's CSVLogger deletes when it starts
    ("Previous log files in this directory will be deleted"): the rows of the steps before ``step`` (the resumed
    checkpoint's global step; later rows, from after that checkpoint, are logged again) are carried into the new file,
    so it holds the whole run. Global rank 0 only (the others do not write)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        rows = [r for r in rows if _step(r) is not None and _step(r) < step]
        writer = logger.experiment  # created now: Lightning removes the old file here
        if not hasattr(writer, "metrics"):  # not rank 0 (a dummy experiment)
            continue
        writer.metrics[:0] = rows
        log.info("continuing %s: %d rows of the steps before %d kept", path, len(rows), step)


def _step(row: dict) -> int | None:
    try:
        return int(float(row["step"]))
    except (KeyError, ValueError):
        return None
