"""What a Hydra + Lightning run needs around the library: loggers, callbacks, DDP relaunch, safe outputs, errors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from diffusion.checks import root_cause  # noqa: F401 - also imported from here

#: the Hydra configuration directory every CLI composes from
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("diffusion")


class UsageError(Exception):
    """A bad setting or input found before any work starts; the CLI prints it as one line and exits 2."""


class TrainingFault(Exception):
    """A fault that stops a run during the work (a non-finite loss, a checkpoint that cannot be written); the CLI
    prints it as one line and exits 1. Checkpoints written before it are kept as they were."""



#: the rank variables of Lightning's DDP re-launch (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK) and SLURM
_RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_rank_zero() -> bool:
    """True in the process that owns the run directory: global rank 0 of whichever launcher started it."""
    return all(os.environ.get(key, "0") == "0" for key in _RANK_KEYS)


def build_or_usage_error(what: str, fn):
    """Run a constructor; a bad value becomes a one-line UsageError.

    The package's ValueErrors already name the setting ("schedule T=0 is invalid: ..."); other errors a bad value
    can cause (a TypeError for a list given as a number, say) are prefixed with the config groups involved.
    """
    try:
        return fn()
    except UsageError:
        raise
    except MissingMandatoryValue as exc:
        raise UsageError(f"{exc.full_key} is required: pass {exc.full_key}=<value>") from exc
    except Exception as exc:  # noqa: BLE001
        cause = root_cause(exc)
        if isinstance(cause, ValueError):
            raise UsageError(str(cause)) from exc
        if isinstance(cause, (TypeError, KeyError)):
            raise UsageError(f"{what}: {type(cause).__name__}: {cause}") from exc
        if type(cause).__name__ == "MisconfigurationException":  # Lightning's refusal of a setting (trainer.*)
            raise UsageError(f"{what}: {cause}") from exc
        raise


# ----------------------------------------------------------------------------------------------- config resolvers
def _deepest_resolution(image_size, channel_mult) -> int:
    from diffusion.models.settings import deepest_resolution  # torch-free

    return deepest_resolution(image_size, channel_mult)


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/ uses, registered when this module is imported (every CLI and test imports it):
    ``${deepest_resolution:<image_size>,<channel_mult>}``, the UNet's lowest-resolution level in pixels
    (conf/model/unet.yaml's default ``attention_resolutions``: the default model fits the data it is given)."""
    if not OmegaConf.has_resolver("deepest_resolution"):
        OmegaConf.register_new_resolver("deepest_resolution", _deepest_resolution)


register_resolvers()


def share_config_store() -> None:
    """Make Hydra share its ConfigStore (a process-wide singleton) instead of deep-copying it.

    Each ``CachingConfigRepository`` deep-copies its repository, and with it the StructuredConfigSource's reference
    to ``ConfigStore.instance()``: every structured config Hydra and its plugins registered (the Hydra schema, the
    submitit launchers, the Optuna sweeper and samplers). ``--help`` builds one such repository per config group it
    lists (about 125 here), which took 1.3 s of a 2.4 s ``python -m diffusion.train --help``; a sweep builds one per
    job. Reading from the store already copies what it returns (``ConfigStore.load``), so sharing it changes no
    config: Hydra's main branch reads the live singleton instead of a stored one (facebookresearch/hydra#2928;
    hydra-core 1.3.8 still stores and copies it). The help texts with and without this are compared in tests/test_cli_startup.py."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.__deepcopy__ = lambda self, memo: self


share_config_store()


# ----------------------------------------------------------------------------------------------- Hydra + DDP
def hydra_job():
    """The HydraConfig of this job, or None outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


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
    :func:`diffusion.cluster.ranks_from_scheduler`) is left as it is: Lightning re-launches nothing there, and the
    rank variables, the command line and the process group of those tasks are theirs.
    """
    from hydra.types import RunMode

    from diffusion.cluster import ranks_from_scheduler

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
    (:func:`diffusion.cluster.slurm_run_stamp`): the same on every node and again in a requeued job, which so finds
    its run directory. Under torchrun global rank 0 puts its launch time into the rendezvous store that torchrun's
    agent serves at MASTER_ADDR:MASTER_PORT (the store ``init_process_group`` joins later) and the other ranks wait
    for it. Elsewhere, or when the stamp is already set, nothing happens. Returns the stamp.
    """
    if os.environ.get(RUN_STAMP_ENV):
        return os.environ[RUN_STAMP_ENV]
    from diffusion.cluster import slurm_run_stamp

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


def save_run_config(cfg: DictConfig, keep_existing: bool = False) -> Path | None:
    """Write what Hydra writes into ``<run>/.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), once the run's
    checks have passed: conf/hydra sets ``output_subdir: null`` so that a refused run (a used directory, a bad value)
    changes nothing in the directory it was pointed at. Only the launching process writes; each file is written
    under a temporary name and renamed into place. ``keep_existing`` (a requeued job, same command line) leaves the
    files of the job's first start as they are. Returns the folder, or None outside Hydra or on other ranks."""
    hc = hydra_job()
    if hc is None or not is_rank_zero():
        return None
    folder = Path(hc.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        if not (keep_existing and (folder / name).is_file()):
            write_text_atomic(folder / name, OmegaConf.to_yaml(node))
    return folder


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def job_names() -> tuple[str | None, str | None]:
    """(W&B group, run name): a sweep's directory groups its jobs; a job is named by its overrides."""
    from hydra.types import RunMode

    hc = hydra_job()
    if hc is None:
        return None, None
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name, hc.job.override_dirname or f"job{hc.job.num}"
    return None, Path(hc.runtime.output_dir).name


# ----------------------------------------------------------------------------------------------- W&B
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


# ----------------------------------------------------------------------------------------------- building
def instantiate_group(group: DictConfig | None, what: str) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); ``null`` entries are skipped."""
    objects = []
    for name, conf in (group or {}).items():
        if conf is None:
            continue
        if "_target_" not in conf:
            raise UsageError(f"{what}.{name} has no _target_: every {what} entry must name a class")
        try:
            objects.append(instantiate(conf))
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the entry
            raise UsageError(f"{what}.{name}: {root_cause(exc)}") from exc
    return objects


def check_resume_and_outputs(cfg: DictConfig) -> Path | None:
    """Refuse a missing checkpoint, and refuse to write over checkpoints a previous run left in the output dir,
    except in a requeued SLURM job: when the directory's ``last.ckpt`` was written by this very job (it records
    ``slurm_job_id``) and SLURM has restarted it, ``ckpt_path`` becomes that file and the run continues there.
    Returns that file (a requeued run), else None."""
    from diffusion import requeue

    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise UsageError(f"ckpt_path={ckpt} does not exist or is not a file")
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        if requeue.slurm_job_id() and requeue.slurm_restart_count() >= 1 and is_rank_zero():
            log.warning("SLURM job %s was requeued (restart %d) but its run directory %s holds no checkpoint: "
                        "training starts from the beginning (the run directory must not depend on the start time: "
                        "hydra.run.dir=<one per job>)", requeue.slurm_job_id(), requeue.slurm_restart_count(),
                        cfg.paths.output_dir)
        return None
    own, why_not = requeue.own_last_checkpoint(ckpt_dir)  # every rank: they all resume from it
    if own is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.ckpt_path = str(own)
        if is_rank_zero():
            instead = f" (not ckpt_path={ckpt})" if ckpt not in (None, str(own)) else ""
            log.info("requeued SLURM job %s (restart %d): resuming from %s%s", requeue.slurm_job_id(),
                     requeue.slurm_restart_count(), own, instead)
        return own
    if is_rank_zero():
        raise UsageError(
            f"output directory {cfg.paths.output_dir} already holds checkpoints: choose another hydra.run.dir "
            "(or none, for a fresh timestamped one); to continue that run pass ckpt_path=<its last.ckpt>"
            + (f" (a requeued SLURM job would continue it by itself, but {why_not})" if why_not else "")
        )
    return None


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


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
        from diffusion.checkpoints import load_file

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


def exits_on_usage_error(fn):
    """CLI entry points: a UsageError becomes one line on stderr and exit status 2 (no traceback), and so does a
    PermissionError (a folder or file the run may not write or read: it names the path); a TrainingFault (a
    fault during training: NaN loss, full disk) one line and exit status 1.

    In a job of a sweep (``-m``) the line names the job. A sweeper that lets jobs fail (``hydra.sweeper.
    max_failure_rate`` > 0: the Optuna sweeper of conf/hparams_search/) gets the error raised on: Hydra records the
    job as failed, the sweeper marks the trial FAIL and the study goes on. Otherwise (Hydra's basic sweeper) the
    first failed job ends the sweep, as a single run ends."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, TrainingFault) as err:
            from diffusion.sweeps import sweep_job_number  # sweeps builds on this module

            job = sweep_job_number()
            print(f"error: {'' if job is None else f'job {job}: '}{err}", file=sys.stderr)
            if job is not None and (hydra_job().sweeper.get("max_failure_rate") or 0) > 0:
                raise  # to the sweeper, which records this job (trial) as failed and goes on
            sys.exit(2 if isinstance(err, UsageError) else 1)
        except PermissionError as err:
            print(f"error: permission denied on {err.filename or err}: choose paths this user may write "
                  "(hydra.run.dir, paths.cache_dir) and read (data.root, ckpt / ckpt_path)", file=sys.stderr)
            sys.exit(2)

    return wrapper


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


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


class OutputDirCheck(_HydraCallback):
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
