"""Which job this process is: its Hydra job (a single run or a sweep's job, its number and names) and whether it
is the rank that owns the run directory. Torch-free; the lowest layer of the run machinery."""

from __future__ import annotations

import os
from pathlib import Path

#: the rank variables of Lightning's DDP re-launch (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK) and SLURM
_RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_rank_zero() -> bool:
    """True in the process that owns the run directory: global rank 0 of whichever launcher started it."""
    return all(os.environ.get(key, "0") == "0" for key in _RANK_KEYS)


def hydra_job():
    """The HydraConfig of this job, or None outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def job_names() -> tuple[str | None, str | None]:
    """(W&B group, run name): a sweep's directory groups its jobs; a job is named by its overrides."""
    from hydra.types import RunMode

    hc = hydra_job()
    if hc is None:
        return None, None
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name, hc.job.override_dirname or f"job{hc.job.num}"
    return None, Path(hc.runtime.output_dir).name


def sweep_job_number() -> int | None:
    """This job's number in a sweep (its directory name, ``hydra.job.num``; an Optuna search's trial number), or
    None outside a multirun (a single run, or a DDP rank re-launched as a single run of the job's overrides)."""
    from hydra.types import RunMode

    hc = hydra_job()
    return hc.job.num if hc is not None and hc.mode == RunMode.MULTIRUN else None
