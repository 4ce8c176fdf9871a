"""Several processes, one run: Lightning's re-launched DDP ranks join the job that started them (also inside a
sweep), and every rank of srun or torchrun resolves the same run directory."""

from __future__ import annotations

import os
import sys

from omegaconf import read_write

from diffusion.run.jobs import hydra_job

# What Lightning's DDP launcher writes into the launching process's environment; see prepare_ddp_relaunch.
_DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_ENV_AT_START = {k: os.environ.get(k) for k in _DDP_ENV_KEYS}


def prepare_ddp_relaunch() -> None:
    """Make Lightning's re-launched DDP ranks join *this* job, also inside a multirun sweep.

    Lightning starts ranks 1..N-1 as ``python -m diffusion.train <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>``.
    Inside ``-m`` that command line is the whole sweep, so every rank would start a sweep of its own (Lightning
    #11300, #18175). Here the command line becomes this job's own overrides, without ``-m`` and with
    ``hydra.mode=RUN`` (a search preset sets ``hydra.mode: MULTIRUN``), and ``hydra.run.dir``
    becomes this job's output directory, so the ranks compose the same config and write to the same place.
    The launcher also leaves LOCAL_RANK, MASTER_PORT, ... in the sweep process's environment, after which the next
    job would take its ranks as started externally, and the previous job's process group, whose other ranks have
    exited: each job starts from the environment the sweep started with and without a process group.

    A job whose ranks a scheduler started (SLURM's tasks, a submitit local job's tasks: see
    :func:`diffusion.run.cluster.ranks_from_scheduler`) is left as it is: Lightning re-launches nothing there, and the
    rank variables, the command line and the process group of those tasks are theirs.
    """
    from hydra.types import RunMode

    from diffusion.run.cluster import ranks_from_scheduler

    hc = hydra_job()
    if hc is None or ranks_from_scheduler():
        return
    with read_write(hc):
        hc.run.dir = hc.runtime.output_dir
    if hc.mode == RunMode.MULTIRUN:  # hydra.mode=RUN: a config that sets hydra.mode (hparams_search=...) must not sweep
        sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]
        for key, value in _ENV_AT_START.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


RUN_STAMP_ENV = "DIFFUSION_RUN_STAMP"
RUN_STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


def share_run_stamp(timeout_s: float = 300.0) -> str | None:
    """Under srun (SLURM) or torchrun, make every rank (on every node) resolve the same run directory.

    Each rank composes its own config, and ``${now:}`` in ``hydra.run.dir`` differs between processes started a
    second apart; every rank exports one stamp as ``DIFFUSION_RUN_STAMP``, which conf/hydra/default.yaml uses in
    place of the time. Under SLURM it is the job's own name, ``slurm-<job id>[.<step id>]``
    (:func:`diffusion.run.cluster.slurm_run_stamp`): the same on every node and again in a requeued job, which so finds
    its run directory. Under torchrun global rank 0 puts its launch time into the rendezvous store that torchrun's
    agent serves at MASTER_ADDR:MASTER_PORT (the store ``init_process_group`` joins later) and the other ranks wait
    for it. Elsewhere, or when the stamp is already set, nothing happens. Returns the stamp.
    """
    if os.environ.get(RUN_STAMP_ENV):
        return os.environ[RUN_STAMP_ENV]
    from diffusion.run.cluster import slurm_run_stamp

    stamp = slurm_run_stamp()
    if stamp is not None:
        os.environ[RUN_STAMP_ENV] = stamp
        return stamp
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    from datetime import datetime, timedelta

    from torch.distributed.rendezvous import _create_c10d_store

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size,
                               timedelta(seconds=timeout_s))
    key = f"diffusion/run_stamp/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        store.set(key, datetime.now().strftime(RUN_STAMP_FORMAT))
    stamp = store.get(key).decode()
    os.environ[RUN_STAMP_ENV] = stamp
    return stamp
