"""Runs that a cluster scheduler starts: SLURM (a user's own ``srun``, or Hydra's submitit launcher) and submitit's
local executor. What such a run needs from the framework, and nothing else (the schedulers and Hydra's launcher do
the launching; conf/hydra/launcher/ holds their settings):

- :func:`slurm_detected`: whether SLURM started this process, decided as Lightning decides it (its
  ``SLURMEnvironment`` then reads the ranks from SLURM's tasks and Lightning starts no rank itself);
- :func:`slurm_job_id`, :func:`slurm_restart_count`: which SLURM job this is (the id it is requeued under) and how
  often it was requeued;
- :func:`slurm_run_stamp`: the name every task of one SLURM job step shares (``slurm-<job>[.<step>]``), the same on
  every node and after a requeue, which ``run.ddp.share_run_stamp`` puts in place of the launch time;
- :func:`ranks_from_scheduler`: whether this job's DDP ranks are tasks that a scheduler started (then
  ``run.ddp.prepare_ddp_relaunch`` leaves their environment, command line and process group alone);
- :func:`adopt_submitit_local_ranks`: the tasks of a submitit local job become the job's DDP ranks (Lightning
  reads them as started externally, like torchrun's), so a job has the same layout as on SLURM;
- :func:`check_job_tasks`: refuse a run whose trainer.devices x trainer.num_nodes is not the job's task count;
- :class:`LauncherCheck`: refuse submitit launcher settings that cannot work, before a sweep submits anything.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import warnings

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.run.errors import UsageError

#: Hydra's submitit launchers (hydra-submitit-launcher), by _target_, and the conf/hydra/launcher/ file of each
SUBMITIT_LAUNCHERS = {
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "slurm",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "submitit_local",
}

# conf/hydra/launcher/submitit_local.yaml takes the name of the plugin's own config (the name the issue and
# submitit's docs use), so Hydra merges it onto the plugin's schema of that name and warns, in every sweep and every
# job, that this matching is deprecated. The file sets every key of that schema itself and works without it.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against ConfigStore schema")

#: SLURM's special step ids (batch script, extern, interactive, pending...) are >= this: not a step of srun
_SPECIAL_STEPS = 0xFFFFFFF0


def slurm_detected() -> bool:
    """True when SLURM started this process and Lightning will use its ``SLURMEnvironment``: SLURM_NTASKS is set and
    the job is not an interactive one (job name ``bash`` / ``interactive``), and torchrun did not start it (Lightning
    prefers torchrun's environment, also inside a SLURM job)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()


def slurm_job_id() -> str | None:
    """The id SLURM requeues this job under, or None outside SLURM: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>``
    for a task of an array job (each task is requeued on its own), else ``SLURM_JOB_ID``. Both stay the same when
    the job is requeued."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_restart_count() -> int:
    """How often SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 on the first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def slurm_run_stamp() -> str | None:
    """``slurm-<job id>`` (``slurm-<array job id>_<array task id>`` in a job array), with ``.<step id>`` in a step
    that srun started: the same in every task of the step, on every node (also for torchrun started by srun), and
    again when the job is requeued (SLURM keeps the job id and numbers the steps from 0 again). None outside a SLURM
    job, and in an interactive one (job name ``bash`` / ``interactive``, which Lightning does not treat as SLURM
    either), where each run keeps its own launch time."""
    if "SLURM_JOB_ID" not in os.environ:  # outside SLURM: no Lightning import (help and errors answer at once)
        return None
    from lightning.fabric.plugins.environments.slurm import _is_slurm_interactive_mode

    if _is_slurm_interactive_mode():
        return None
    job = slurm_job_id()  # the id SLURM requeues this job under
    if not job:
        return None
    step = os.environ.get("SLURM_STEP_ID", "")
    return f"slurm-{job}" + (f".{step}" if step.isdigit() and int(step) < _SPECIAL_STEPS else "")


def _submitit_local_tasks() -> int:
    """The number of tasks of the submitit local job this process is a task of (0 outside one)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or "SUBMITIT_LOCAL_GLOBALID" not in os.environ:
        return 0
    return int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))


def ranks_from_scheduler() -> bool:
    """True when this job's DDP ranks are processes that a scheduler started, so that Lightning re-launches none:
    SLURM's tasks (:func:`slurm_detected`), or the tasks of a submitit local job of several tasks."""
    return slurm_detected() or _submitit_local_tasks() > 1


def adopt_submitit_local_ranks() -> None:
    """In a task of a submitit local job of several tasks (``hydra/launcher=submitit_local`` with
    trainer.devices > 1), name this task's rank as torchrun would (LOCAL_RANK, NODE_RANK, WORLD_SIZE, and one
    MASTER_ADDR:MASTER_PORT per job, from the job id): Lightning then takes the job's tasks as its DDP ranks and
    starts none itself (its own re-launch would run ``python -m submitit.core._submit``, not this program)."""
    if _submitit_local_tasks() < 2:
        return
    os.environ["LOCAL_RANK"] = os.environ["SUBMITIT_LOCAL_LOCALID"]
    os.environ["NODE_RANK"] = "0"
    os.environ["WORLD_SIZE"] = os.environ["SUBMITIT_LOCAL_NTASKS"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SUBMITIT_LOCAL_JOB_ID"]) % 20000))


def _devices_per_node(devices) -> int | None:
    """trainer.devices as a number of ranks per node; None for ``auto`` / -1 (Lightning counts what it finds)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        return int(text) if text.isdigit() else None
    return devices if isinstance(devices, int) and devices > 0 else None


def check_job_tasks(trainer: DictConfig) -> None:
    """Each DDP rank is one task of the job that SLURM (or submitit's local executor) started: refuse, before any
    work, a trainer.devices x trainer.num_nodes that is not the job's task layout (Lightning would wait for ranks
    that never come, or start ranks of its own). Outside such a job nothing is checked."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    per_node = _devices_per_node(devices)
    ntasks = _submitit_local_tasks()
    if ntasks:
        if per_node is not None and per_node * nodes != ntasks:
            raise UsageError(
                f"this submitit local job has {ntasks} task(s) but trainer.devices={devices} x trainer.num_nodes="
                f"{nodes} is {per_node * nodes} DDP rank(s): each rank is one task, so hydra.launcher.tasks_per_node "
                "must be trainer.devices (conf/hydra/launcher/submitit_local.yaml) and trainer.num_nodes=1")
        return
    if not slurm_detected():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    per_node_env, nodes_env = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES")
    layout = f"SLURM_NTASKS={ntasks}" + (f", SLURM_NTASKS_PER_NODE={per_node_env}" if per_node_env else "") + (
        f", SLURM_NNODES={nodes_env}" if nodes_env else "")
    fix = ("each DDP rank is one SLURM task: run with sbatch/srun --nodes=<trainer.num_nodes> "
           "--ntasks-per-node=<trainer.devices> (hydra/launcher=slurm does), or set trainer.devices and trainer.num_nodes "
           "to the job's layout")
    if per_node is not None and per_node * nodes != ntasks:
        raise UsageError(f"SLURM started {ntasks} task(s) ({layout}) but trainer.devices={devices} x trainer.num_nodes="
                         f"{nodes} is {per_node * nodes} DDP rank(s): {fix}")
    if nodes_env is not None and nodes_env.isdigit() and int(nodes_env) != nodes:
        raise UsageError(f"this SLURM job has {nodes_env} node(s) ({layout}) but trainer.num_nodes={nodes}: {fix}")
    if ntasks > 1 and per_node_env is None:  # Lightning's SLURMEnvironment refuses this (a RuntimeError)
        raise UsageError(f"SLURM started {ntasks} tasks without --ntasks-per-node ({layout}): Lightning needs it; {fix}")
    if per_node is not None and per_node_env is not None and per_node_env.isdigit() and int(per_node_env) != per_node:
        raise UsageError(f"SLURM started {per_node_env} task(s) per node ({layout}) but trainer.devices={devices}: {fix}")


# ----------------------------------------------------------------------------------------------- before a sweep
_LAUNCHER_ARG = re.compile(r"^hydra/launcher=(?P<name>\S+)$")


def require_launcher_plugin(argv: list[str] | None = None) -> None:
    """``hydra/launcher=slurm`` or ``submitit_local`` without hydra-submitit-launcher installed: one line and exit 2
    (Hydra would print "Could not load 'hydra/launcher/submitit_slurm'" and its config search path)."""
    for arg in (sys.argv[1:] if argv is None else argv):
        match = _LAUNCHER_ARG.match(arg)
        if match and match["name"] in SUBMITIT_LAUNCHERS.values() and importlib.util.find_spec(
                "hydra_plugins.hydra_submitit_launcher") is None:
            print(f"error: {arg} needs Hydra's submitit launcher, which is not installed: pip install -e \".[cluster]\"",
                  file=sys.stderr)
            sys.exit(2)


def _swept(config: DictConfig, keys: tuple[str, ...]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    return [o.input_line for o in parsed if o.is_sweep_override() and o.key_or_group in keys]


def launcher_problem(config: DictConfig) -> str | None:
    """Why the submitit launcher that ``config`` (a sweep's whole config, hydra node included) selects cannot run
    its jobs, or None (also for any other launcher)."""
    name = SUBMITIT_LAUNCHERS.get(str(OmegaConf.select(config, "hydra.launcher._target_")))
    if name is None:
        return None
    swept = _swept(config, ("trainer.devices", "trainer.num_nodes"))
    if swept:
        return (f"{' '.join(swept)} cannot be swept with hydra/launcher={name}: every job of the sweep gets the same "
                "tasks and nodes (hydra.launcher.tasks_per_node / nodes); run one sweep per device count")
    launcher = config.hydra.launcher
    if name == "submitit_local" and OmegaConf.select(config, "trainer.num_nodes", default=1) != 1:
        return (f"hydra/launcher=submitit_local runs on this machine only: trainer.num_nodes="
                f"{config.trainer.num_nodes} needs hydra/launcher=slurm (or trainer.num_nodes=1)")
    raw = OmegaConf.to_container(launcher, resolve=False)
    for key, source, minimum in (("tasks_per_node", "trainer.devices", 1), ("nodes", "trainer.num_nodes", 1),
                                 ("gpus_per_node", "trainer.devices", 0)):
        try:
            value = launcher[key]
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve to a number
            value = OmegaConf.select(config, source, default=None)
            return (f"hydra/launcher={name} needs {source} to be a number (the job's {key}), not {value!r}: pass "
                    f"{source}=<n> (on SLURM one task per device: trainer.devices=<GPUs per node>), or set "
                    f"hydra.launcher.{key}=<n>")
        if value is None and key == "gpus_per_node":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            named = source if raw.get(key) == "${" + source + "}" else f"hydra.launcher.{key}"
            return f"{named}={value!r} is invalid for hydra/launcher={name}: it must be an integer >= {minimum}"
    if name == "slurm" and shutil.which("srun") is None:
        return ("hydra/launcher=slurm submits the jobs with sbatch and starts their tasks with srun, and this machine "
                "has no srun: run the sweep on a SLURM login node (hydra/launcher=submitit_local tries it here)")
    return None


class LauncherCheck(HydraCallback):
    """Refuse, in one line and exit status 2, a sweep whose submitit launcher settings cannot work (see
    :func:`launcher_problem`) before it submits anything; Hydra would fail later with a traceback (or, for a swept
    trainer.devices, give every job the first job's task count). Enabled in conf/hydra/default.yaml. Hydra turns an
    exception raised by a callback into a warning, so this one exits itself."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        problem = launcher_problem(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
