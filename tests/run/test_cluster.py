"""Sweeps and multi-node runs on SLURM through Hydra's submitit launcher, on a machine without SLURM: submitit's
local executor runs a real sweep; tests/fake_slurm.py stands in for sbatch/srun/sacct (the sbatch script submitit
writes is read, not submitted); SLURM's tasks are simulated with the environment variables srun gives them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict, read_write

from diffusion.run import cluster, ddp, jobs
from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError
from tests import fake_slurm
from tests.conftest import FAST, REPO, clean_env

# our submitit_local.yaml takes the name of the plugin's config; pytest resets diffusion.run.cluster's filter of Hydra's
# warning about that
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_local' is validated against ConfigStore")

#: what a job's output does not need here (no sample grids)
QUIET = [*FAST, "logger=none", "module.sample_every_n_epochs=0", "final_samples=false"]

#: the variables of SLURM, submitit, torchrun and Lightning's DDP launcher that say who started a process
_LAUNCH_PREFIXES = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_")
_LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                ddp.RUN_STAMP_ENV)


def _launch_vars(env) -> list[str]:
    return [k for k in env if k.startswith(_LAUNCH_PREFIXES) or k in _LAUNCH_KEYS]


def subprocess_env(tmp_path: Path, **extra) -> dict:
    """A fresh user's environment outside any scheduler (also when the tests themselves run in a SLURM job)."""
    env = clean_env(tmp_path)
    for key in _launch_vars(env):
        del env[key]
    env.update(extra)
    return env


@pytest.fixture
def no_scheduler(monkeypatch):
    """This process as if started by no scheduler; ``task(**variables)`` makes it a task with those variables.
    Every launch variable is restored afterwards, also those the code under test sets (DIFFUSION_RUN_STAMP,
    LOCAL_RANK..., MASTER_ADDR and MASTER_PORT)."""
    for key in {*_launch_vars(os.environ), *_LAUNCH_KEYS}:  # recorded as they are now, restored at the end
        monkeypatch.setenv(key, "-")
        monkeypatch.delenv(key)

    def task(**variables):
        for key in _launch_vars(os.environ):
            monkeypatch.delenv(key)
        for key, value in variables.items():
            monkeypatch.setenv(key, str(value))

    return task


def srun_task(procid: int, ntasks: int = 2, per_node: int = 1, job: str = "7781", **more) -> dict:
    """The variables srun gives task ``procid`` of a job of ``ntasks`` tasks, ``per_node`` on each node."""
    return dict(SLURM_JOB_ID=job, SLURM_JOB_NAME="train", SLURM_NTASKS=ntasks, SLURM_NTASKS_PER_NODE=per_node,
                SLURM_NNODES=ntasks // per_node, SLURM_JOB_NUM_NODES=ntasks // per_node, SLURM_PROCID=procid,
                SLURM_LOCALID=procid % per_node, SLURM_NODEID=procid // per_node, SLURM_STEP_ID=0,
                SLURM_NODELIST="gpu[01-02]", SLURM_JOB_NODELIST="gpu[01-02]", **more)


def composed(*overrides: str):
    """The whole config of ``python -m diffusion.train <overrides>``, hydra node included."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# ----------------------------------------------------------------------------------------------- the two sweeps
def test_submitit_local_sweep_runs_each_job_in_its_directory_and_the_report_reads_it(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "diffusion.train", "-m", "hydra/launcher=submitit_local", "schedule.T=20,40", *QUIET,
           f"hydra.sweep.dir={sweep}"]
    rc, output = _run_in_own_session(cmd, subprocess_env(tmp_path), timeout_s=600)
    assert rc == 0, output[-3000:]
    assert "validated against ConfigStore schema" not in output
    # submitit ran the jobs, one process each: its folder holds one result per job
    assert len(list((sweep / ".submitit").glob("*/*_0_result.pkl"))) == 2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, T in zip(jobs, (20, 40)):
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["schedule"]["T"] == T
        assert f"schedule.T={T}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 2
        # launched with conf/hydra/launcher/submitit_local.yaml: a task and a GPU (when there is one) per device; the
        # plugin's own config would hide every GPU from the job (gpus_per_node unset: CUDA_VISIBLE_DEVICES="")
        launcher = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
        assert launcher["_target_"].endswith("LocalLauncher")
        assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == "${trainer.devices}"
    from diffusion.report import report

    out = report(sweep)
    assert out["swept"] == ["schedule.T"]
    assert [(j["job"], j["params"]["schedule.T"]) for j in out["jobs"]] == [("0", 20), ("1", 40)]
    assert all(j["metrics"]["val/loss"] > 0 for j in out["jobs"])


def test_slurm_sweep_renders_one_array_job_of_two_nodes_with_four_gpus_each(tmp_path):
    """The sbatch script submitit writes for ``-m hydra/launcher=slurm trainer.devices=4 trainer.num_nodes=2``, given
    to a fake sbatch that keeps it and counts the jobs as finished at once (nothing runs, nothing waits)."""
    sweep, state = tmp_path / "sweep", tmp_path / "slurm"
    env = subprocess_env(tmp_path, **fake_slurm.install(tmp_path / "bin", state), FAKE_SLURM_MODE="complete")
    cmd = [sys.executable, "-m", "diffusion.train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
           "hydra.launcher.timeout_min=90", "trainer.devices=4", "trainer.num_nodes=2", "schedule.T=500,1000",
           "logger=none", f"hydra.sweep.dir={sweep}"]
    rc, output = _run_in_own_session(cmd, env, timeout_s=300)
    assert rc == 0, output[-3000:]
    scripts = list(state.glob("sbatch-*.sh"))
    assert len(scripts) == 1, "one job array for the whole sweep"
    script = scripts[0].read_text()
    options = fake_slurm.sbatch_options(script)
    assert options["nodes"] == "2" and options["ntasks-per-node"] == "4" and options["gpus-per-node"] == "4"
    assert options["partition"] == "gpu" and options["time"] == "90" and options["job-name"] == "train"
    assert options["array"] == "0-1%2"
    # SIGUSR1 120 s before the time limit (Lightning's auto-requeue signal), and a job that may be requeued
    assert options["signal"] == "USR1@120" and options["requeue"] is True
    command = script.strip().splitlines()[-1].split()
    assert command[:2] == ["srun", "--unbuffered"]  # srun starts the 8 tasks: each one DDP rank
    assert command[-4:] == ["-u", "-m", "submitit.core._submit", f"{sweep}/.submitit/%j"]
    # each task runs the pickled Hydra job: our training task with that job's overrides
    from submitit.core.utils import DelayedSubmission

    for index, T in enumerate((500, 1000)):
        job = DelayedSubmission.load(sweep / ".submitit" / f"4200_{index}" / f"4200_{index}_submitted.pkl")
        # diffusion/train.py's main, as @hydra.main hands it to the launcher (the CLI's __main__: cloudpickle keeps
        # its code by value), calling train()
        task = job.function.task_function
        assert task.__name__ == task.__wrapped__.__name__ == "main"  # exits_on_usage_error(main)
        assert task.__wrapped__.__globals__["train"].__code__.co_varnames[:1] == ("cfg",)
        assert f"schedule.T={T}" in job.args[0] and "trainer.devices=4" in job.args[0]
        assert job.args[1:3] == ("hydra.sweep.dir", index)
    assert not [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")], "nothing may have run"


# ----------------------------------------------------------------------------------------------- srun's tasks
@pytest.mark.parametrize("case, variables, stamp", [
    ("a job step", {}, "slurm-7781.0"),
    ("a requeued job", {"SLURM_RESTART_COUNT": 1}, "slurm-7781.0"),
    ("a job array's task", {"SLURM_ARRAY_JOB_ID": 7700, "SLURM_ARRAY_TASK_ID": 3}, "slurm-7700_3.0"),
    ("torchrun started by srun", {"TORCHELASTIC_RUN_ID": "x", "RANK": 0, "WORLD_SIZE": 2}, "slurm-7781.0"),
])
def test_srun_tasks_of_a_job_resolve_one_run_directory(no_scheduler, case, variables, stamp):
    """Each task composes its own config a second apart (``${now:}`` alone would differ): both use the job's stamp."""
    import time

    dirs = []
    for procid in (0, 1):
        time.sleep(1.1 * procid)  # the second task a second later
        no_scheduler(**srun_task(procid, **{k: (procid if k == "RANK" else v) for k, v in variables.items()}))
        assert ddp.share_run_stamp() == stamp
        cfg = composed("task_name=train", "paths.log_dir=logs")
        dirs.append((cfg.hydra.run.dir, cfg.hydra.sweep.dir))
    assert dirs[0] == dirs[1] == (f"logs/train/{stamp}", f"logs/train/multirun/{stamp}"), case


def test_interactive_slurm_job_keeps_each_runs_launch_time(no_scheduler):
    """Job name bash / interactive (salloc): Lightning does not treat it as SLURM, and each run keeps its own time."""
    no_scheduler(**{**srun_task(0, ntasks=1), "SLURM_JOB_NAME": "interactive"})
    assert ddp.share_run_stamp() is None and ddp.RUN_STAMP_ENV not in os.environ
    assert not cluster.slurm_detected()


def _hydra_multirun_job(tmp_path, overrides=("schedule.T=20",)):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = composed(*overrides)
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path / "job")
        cfg.hydra.overrides.task = list(overrides)
    HydraConfig.instance().set_config(cfg)


@pytest.fixture
def process_group():
    """A gloo process group of one rank, as a job's first DDP run leaves it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def hydra_job_config():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("scheduler", ["slurm", "none"])
def test_prepare_ddp_relaunch_leaves_the_tasks_of_a_slurm_job_alone(no_scheduler, process_group, hydra_job_config,
                                                                    tmp_path, monkeypatch, scheduler):
    """Inside a sweep's job (``srun python -m diffusion.train -m ...`` runs the whole sweep in each task), the
    re-launch preparation must not touch what SLURM's tasks own: their rank variables, the command line, and the
    process group the previous job's ranks (the same tasks) share. Without SLURM it resets them (the contrast)."""
    if scheduler == "slurm":
        no_scheduler(**srun_task(1), MASTER_ADDR="gpu01", MASTER_PORT="17781")
    else:
        no_scheduler(LOCAL_RANK=0, MASTER_PORT="17781")  # what Lightning's launcher leaves behind after a job
    _hydra_multirun_job(tmp_path)
    argv = ["diffusion/train.py", "-m", "schedule.T=20,40"]
    monkeypatch.setattr(sys, "argv", list(argv))
    before = dict(os.environ)
    ddp.prepare_ddp_relaunch()
    if scheduler == "slurm":
        assert sys.argv == argv and dict(os.environ) == before
        assert process_group.is_initialized()
    else:
        assert sys.argv == ["diffusion/train.py", "schedule.T=20", "hydra.mode=RUN"]
        assert all(os.environ.get(k) == v for k, v in ddp._ENV_AT_START.items())  # as when the sweep started
        assert not process_group.is_initialized()


@pytest.mark.parametrize("case, variables, environment, relaunch", [
    ("srun task 1 of 2", srun_task(1), "SLURMEnvironment", False),
    ("an interactive allocation", {**srun_task(1), "SLURM_JOB_NAME": "bash"}, "LightningEnvironment", True),
    ("torchrun started by srun", {**srun_task(1), "TORCHELASTIC_RUN_ID": "x", "RANK": 1, "LOCAL_RANK": 0,
                                  "WORLD_SIZE": 2, "GROUP_RANK": 1}, "TorchElasticEnvironment", False),
    ("no scheduler", {}, "LightningEnvironment", True),
])
def test_slurm_is_detected_as_lightning_detects_it_and_lightning_starts_no_rank_there(no_scheduler, monkeypatch, case,
                                                                                      variables, environment, relaunch):
    """Lightning 2.6's own choice, which diffusion.run.cluster.slurm_detected must follow: under srun its
    SLURMEnvironment reads the rank from SLURM_PROCID and no launcher re-runs the command line."""
    no_scheduler(**variables)
    trainer = _ddp_trainer(devices=1, num_nodes=2)
    assert type(trainer.strategy.cluster_environment).__name__ == environment, case
    assert cluster.slurm_detected() == (environment == "SLURMEnvironment")
    assert trainer.global_rank == (0 if relaunch else 1)
    assert _starts_ranks(trainer, monkeypatch) == relaunch


def _ddp_trainer(**kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", strategy="ddp", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _starts_ranks(trainer, monkeypatch) -> bool:
    """Whether Lightning's DDP launcher would start rank processes of its own (re-running the command line) when
    fit() begins: its launch(), with the start of those processes replaced by a record of it."""
    class Started(Exception):
        pass

    def start_children(self):
        raise Started

    launcher = trainer.strategy.launcher
    monkeypatch.setattr(type(launcher), "_call_children_scripts", start_children)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # launch() would set torch's threads
    try:
        assert launcher.launch(lambda: "fit") == "fit"
    except Started:
        return True
    return False


def test_submitit_local_tasks_become_the_jobs_ranks(no_scheduler, monkeypatch):
    no_scheduler(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_NTASKS=2, SUBMITIT_LOCAL_GLOBALID=1, SUBMITIT_LOCAL_LOCALID=1,
                 SUBMITIT_LOCAL_JOB_ID=31234)
    assert cluster.ranks_from_scheduler()
    cluster.adopt_submitit_local_ranks()
    assert not jobs.is_rank_zero()
    trainer = _ddp_trainer(devices=2)
    assert trainer.global_rank == 1 and trainer.world_size == 2 and not _starts_ranks(trainer, monkeypatch)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(20000 + 31234 % 20000)


@pytest.mark.parametrize("variables, devices, nodes, text", [
    (srun_task(0, ntasks=8, per_node=4), 4, 1, ("SLURM started 8 task(s) (SLURM_NTASKS=8, SLURM_NTASKS_PER_NODE=4, "
                                                "SLURM_NNODES=2) but trainer.devices=4 x trainer.num_nodes=1 is 4")),
    (srun_task(0, ntasks=8, per_node=4), 2, 4, "this SLURM job has 2 node(s)"),
    (srun_task(0, ntasks=8, per_node=4), "auto", 1, "this SLURM job has 2 node(s)"),
    ({k: v for k, v in srun_task(0, ntasks=4, per_node=2).items() if k != "SLURM_NTASKS_PER_NODE"}, 2, 2,
     "SLURM started 4 tasks without --ntasks-per-node"),
    ({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": 1, "SUBMITIT_LOCAL_GLOBALID": 0}, 2, 1,
     "this submitit local job has 1 task(s) but trainer.devices=2"),
])
def test_trainer_ranks_that_are_not_the_jobs_tasks_are_refused_in_one_line(no_scheduler, variables, devices, nodes, text):
    from diffusion.run.preflight import check_settings

    no_scheduler(**variables)
    cfg = OmegaConf.create(OmegaConf.to_container(composed(f"trainer.devices={devices}", f"trainer.num_nodes={nodes}",
                                                           "trainer.accelerator=cpu"), resolve=False))
    with open_dict(cfg):
        del cfg.hydra
    with pytest.raises(UsageError) as err:
        check_settings(cfg)
    assert str(err.value).startswith(text) and "\n" not in str(err.value)


@pytest.mark.parametrize("variables, devices, nodes", [(srun_task(5, ntasks=8, per_node=4), 4, 2),
                                                        (srun_task(1, ntasks=8, per_node=4), "auto", 2), ({}, 2, 1)])
def test_trainer_ranks_that_are_the_jobs_tasks_pass(no_scheduler, variables, devices, nodes):
    no_scheduler(**variables)
    cluster.check_job_tasks(OmegaConf.create({"devices": devices, "num_nodes": nodes}))


# ----------------------------------------------------------------------------------------------- before a sweep
@pytest.mark.parametrize("overrides, swept, text", [
    (["hydra/launcher=slurm", "trainer.devices=auto"], None,
     "hydra/launcher=slurm needs trainer.devices to be a number (the job's tasks_per_node), not 'auto'"),
    (["hydra/launcher=slurm", "trainer.devices=[0,1]"], None, "hydra/launcher=slurm needs trainer.devices to be a number"),
    (["hydra/launcher=slurm"], ["trainer.devices=2,4"], "trainer.devices=2,4 cannot be swept with hydra/launcher=slurm"),
    (["hydra/launcher=slurm", "trainer.num_nodes=0"], None, "trainer.num_nodes=0 is invalid for hydra/launcher=slurm"),
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=-1"], None, "hydra.launcher.gpus_per_node=-1 is invalid"),
    (["hydra/launcher=slurm", "trainer.devices=4"], None, "hydra/launcher=slurm submits the jobs with sbatch"),
    (["hydra/launcher=submitit_local", "trainer.num_nodes=2"], None, "hydra/launcher=submitit_local runs on this machine only"),
    (["hydra/launcher=submitit_local", "trainer.devices=auto"], None, "hydra/launcher=submitit_local needs trainer.devices"),
])
def test_launcher_settings_that_cannot_work_stop_the_sweep_before_it_submits(tmp_path, monkeypatch, capsys, overrides,
                                                                            swept, text):
    """The callback Hydra calls when a sweep starts (conf/hydra/default.yaml), before the launcher exists."""
    from hydra.utils import instantiate

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    cfg = composed(*overrides)
    if swept:
        with read_write(cfg.hydra):
            cfg.hydra.overrides.task = swept
    assert cfg.hydra.callbacks.launcher._target_ == "diffusion.run.cluster.LauncherCheck"
    with pytest.raises(SystemExit) as exit_:
        instantiate(cfg.hydra.callbacks.launcher).on_multirun_start(config=cfg, config_name="config")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {text}") and err.count("\n") == 1, err


@pytest.mark.parametrize("launcher", ["slurm", "submitit_local", "basic"])
def test_launcher_settings_that_work_pass(tmp_path, monkeypatch, launcher):
    fake_slurm.install(tmp_path / "bin", tmp_path / "state")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cfg = composed(f"hydra/launcher={launcher}", "trainer.devices=2")
    assert cluster.launcher_problem(cfg) is None


def test_launcher_without_the_plugin_installed_is_one_line(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else find_spec(name, *a))
    cluster.require_launcher_plugin(["-m", "hydra/launcher=basic"])
    with pytest.raises(SystemExit) as exit_:
        cluster.require_launcher_plugin(["-m", "hydra/launcher=slurm", "schedule.T=500,1000"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: hydra/launcher=slurm needs Hydra's submitit launcher, which is not "
                                       "installed: pip install -e \".[cluster]\"\n")


def test_submitit_local_yaml_sets_every_key_of_the_plugins_schema():
    """conf/hydra/launcher/submitit_local.yaml hides the plugin's config of that name: it must set each of its keys."""
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

    ours = yaml.safe_load((Path(CONFIG_DIR) / "hydra" / "launcher" / "submitit_local.yaml").read_text())
    assert set(ours) == set(OmegaConf.structured(LocalQueueConf).keys())
    cfg = composed("hydra/launcher=submitit_local", "trainer.devices=2")
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.nodes) == (2, 2, 1)


# ----------------------------------------------------------------------------------------------- whole jobs (slow)
@pytest.mark.slow
def test_fake_slurm_job_of_two_nodes_trains_with_its_tasks_as_ranks_in_one_directory(tmp_path):
    """``-m hydra/launcher=slurm trainer.num_nodes=2`` through the fake sbatch/srun: submitit's sbatch script runs,
    srun starts 2 tasks (node 0 and 1), each runs the pickled Hydra job; Lightning's SLURMEnvironment takes them as
    global ranks 0 and 1 (no re-launch: 2 training processes in all), both train in the job's one directory, their
    EMA weights are equal, and only rank 0 writes the checkpoints and the config."""
    sweep, state = tmp_path / "sweep", tmp_path / "slurm"
    env = subprocess_env(tmp_path, **fake_slurm.install(tmp_path / "bin", state), FAKE_SLURM_MODE="run",
                         MASTER_PORT=str(_free_port()))  # else Lightning's 15000 + the job id's last digits
    cmd = [sys.executable, "-m", "diffusion.train", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
           "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp", "schedule.T=20",
           *QUIET, "+callbacks.probe._target_=tests.helpers.RankProbe", f"hydra.sweep.dir={sweep}"]
    try:
        rc, output = _run_in_own_session(cmd, env, timeout_s=400)
        assert rc == 0, output[-3000:]
        job = sweep / "0"
        probes = [json.loads(p.read_text()) for p in sorted(job.glob("probe_rank*.json"))]
        assert [p["global_rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
        assert probes[0]["ema_hash"] == probes[1]["ema_hash"]
        logs = "".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.*")))
        assert logs.count("Initializing distributed: GLOBAL_RANK:") == 2  # one per SLURM task, no re-launched rank
        assert "SLURM auto-requeueing enabled" in logs
        assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
        assert [p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] == ["0"]
    finally:
        _wait_for_fake_jobs(state)


@pytest.mark.slow
def test_srun_tasks_of_a_users_own_job_train_two_nodes_in_one_run_directory(tmp_path):
    """``srun python -m diffusion.train trainer.num_nodes=2 ...`` in a user's own sbatch script (no submitit): each
    task composes its own config, task 1 two seconds later than task 0 (so that their ${now:} differ), and both
    find the job's run directory outputs/train/slurm-<job id>.<step>; they train as global ranks 0 and 1 with equal
    EMA weights, and only rank 0 writes the checkpoints and the config."""
    logs = tmp_path / "logs"
    delay = tmp_path / "delay"
    delay.mkdir()
    (delay / "sitecustomize.py").write_text("import os, time\nif os.environ.get('SLURM_PROCID') == '1':\n    time.sleep(2.0)\n")
    job = {k: str(v) for k, v in srun_task(0, job="5150").items() if not k.endswith(("ID", "NODELIST"))}
    env = subprocess_env(tmp_path, **fake_slurm.install(tmp_path / "bin", tmp_path / "slurm"), **job, SLURM_JOB_ID="5150",
                         SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(_free_port()),
                         PYTHONPATH=os.pathsep.join([str(delay), str(REPO)]))
    cmd = [sys.executable, fake_slurm.__file__, "srun", sys.executable, "-m", "diffusion.train", "trainer.accelerator=cpu",
           "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp", *QUIET,
           "+callbacks.probe._target_=tests.helpers.RankProbe", f"paths.log_dir={logs}"]
    rc, output = _run_in_own_session(cmd, env, timeout_s=400)
    assert rc == 0, output[-3000:]
    assert [p.name for p in (logs / "train").iterdir()] == ["slurm-5150.0"]
    run = logs / "train" / "slurm-5150.0"
    probes = [json.loads(p.read_text()) for p in sorted(run.glob("probe_rank*.json"))]
    assert [p["global_rank"] for p in probes] == [0, 1] and probes[0]["ema_hash"] == probes[1]["ema_hash"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["num_nodes"] == 2


def _run_in_own_session(cmd: list[str], env: dict, timeout_s: float) -> tuple[int, str]:
    """Run ``cmd`` in a process group of its own; on a timeout the whole group (srun's tasks too) is killed."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_fake_jobs(state: Path, timeout_s: float = 120) -> None:
    """The fake scheduler's job may still be exiting after its result was written: wait for its exit status, and
    end the job's processes (its own session) if it has none by then."""
    import signal
    import time

    def unfinished():
        return any(not (state / f"{p.stem}.rc").exists() for p in state.glob("*.running"))

    deadline = time.time() + timeout_s
    while time.time() < deadline and unfinished():
        time.sleep(0.5)
    for pid_file in state.glob("run-*.pid") if unfinished() else ():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_submitit_local_job_of_two_tasks_trains_with_its_tasks_as_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "diffusion.train", "-m", "hydra/launcher=submitit_local", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp", "schedule.T=20", *QUIET,
           "+callbacks.probe._target_=tests.helpers.RankProbe", f"hydra.sweep.dir={sweep}"]
    rc, output = _run_in_own_session(cmd, subprocess_env(tmp_path), timeout_s=400)
    assert rc == 0, output[-3000:]
    probes = [json.loads(p.read_text()) for p in sorted((sweep / "0").glob("probe_rank*.json"))]
    assert [p["global_rank"] for p in probes] == [0, 1] and probes[0]["ema_hash"] == probes[1]["ema_hash"]
    logs = "".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.*")))
    assert logs.count("Initializing distributed: GLOBAL_RANK:") == 2
    assert sorted(p.name for p in (sweep / "0" / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
