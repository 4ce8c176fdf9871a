"""Preemption and requeue: SLURM's warning signal saves last.ckpt at a batch boundary and requeues the job; the requeued
job resumes from it by itself, to the weights and losses of an uninterrupted run; the training loader continues an
epoch where the checkpoint left it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from diffusion.data.datamodule import EpochSeededSampler
from diffusion.data.resumable import FastForwardBatchSampler, ResumableDataLoader
from tests.conftest import REPO, RESUME_RUN, assert_same_training, clean_env


class _Recorded(Dataset):
    """Item i is the tensor [i]; remembers which items were read (the loaded images)."""

    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.read.append(int(i))
        return torch.tensor([int(i)])


def _loader(data, seed=3, num_workers=0, sampler=None):
    return ResumableDataLoader(data, batch_size=4, sampler=sampler or EpochSeededSampler(data, seed), drop_last=True,
                               num_workers=num_workers)


def _batches(iterator) -> list[list[int]]:
    return [b.reshape(-1).tolist() for b in iterator]


def _epoch(loader, epoch: int) -> list[list[int]]:
    it = iter(loader)  # Lightning: the iterator first, set_epoch after (a resumed run's first epoch)
    loader.batch_sampler.sampler.set_epoch(epoch)
    return _batches(it)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_train_loader_continues_an_epoch_at_the_next_batch_without_loading_the_skipped_ones(num_workers):
    """State after 2 of epoch 1's 5 batches, loaded into a new loader: it yields batches 2..4 of epoch 1 (the
    uninterrupted order), reads none of the images of batches 0 and 1, and then epoch 2 whole. Lightning creates the
    resumed epoch's iterator before set_epoch: with workers, an eagerly started iterator would prefetch epoch 0's
    order."""
    reference = _loader(_Recorded(21))
    epochs = {e: _epoch(reference, e) for e in (0, 1, 2)}
    assert len(epochs[1]) == 5 and epochs[0] != epochs[1] != epochs[2]

    first = _loader(_Recorded(21), num_workers=num_workers)
    it = iter(first)
    first.batch_sampler.sampler.set_epoch(1)
    assert _batches([next(it), next(it)]) == epochs[1][:2]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    data = _Recorded(21)
    second = _loader(data, num_workers=num_workers)
    second.load_state_dict(state)
    assert second.state_dict() == state, "a checkpoint saved before the first batch keeps the place"
    assert _epoch(second, 1) == epochs[1][2:]
    if num_workers == 0:  # (the workers' reads happen in their own processes)
        skipped = {i for b in epochs[1][:2] for i in b}
        assert data.read and not skipped & set(data.read), "images of the skipped batches were loaded"
    assert second.state_dict() == {"epoch": 1, "batches": 5}
    assert _epoch(second, 2) == epochs[2], "the next epoch must start at its first batch"


def test_a_state_of_another_epoch_or_of_an_epoch_end_skips_nothing():
    reference = _loader(_Recorded(21))
    epoch2 = _epoch(reference, 2)
    for state in ({"epoch": 1, "batches": 2}, {"epoch": 2, "batches": 5}, {"epoch": 2, "batches": 0}):
        loader = _loader(_Recorded(21))
        loader.load_state_dict(state)
        assert _epoch(loader, 2) == epoch2, state


def test_under_ddp_lightning_swaps_in_its_distributed_sampler_and_each_rank_continues_its_own_shard():
    """Lightning re-creates the loader with a DistributedSampler (seed, epoch, rank) inside the fast-forwarding batch
    sampler: each rank's resumed epoch is the rest of that rank's shard in the DistributedSampler's order."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    data = _Recorded(42)

    def distributed(rank: int):
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = _loader(data)  # as Lightning calls train_dataloader()
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7)
        return _update_dataloader(loader, sampler)

    for rank in (0, 1):
        full = distributed(rank)
        assert type(full) is ResumableDataLoader and isinstance(full.batch_sampler, FastForwardBatchSampler)
        assert isinstance(full.batch_sampler.sampler, DistributedSampler) and full.batch_sampler.sampler.rank == rank
        order = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7)
        order.set_epoch(1)
        shard = list(order)
        expected = [shard[i:i + 4] for i in range(0, 20, 4)]
        assert _epoch(full, 1) == expected

        resumed = distributed(rank)
        resumed.load_state_dict({"epoch": 1, "batches": 3})
        assert _epoch(resumed, 1) == expected[3:]


# ----------------------------------------------------------------------------------------------- a simulated SLURM job
def _slurm_env(tmp_path: Path, job_id: str, **extra: str) -> dict:
    """A single-task SLURM job as Lightning's SLURMEnvironment reads it, with a fake scontrol that records its
    arguments in ``scontrol.log``."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
        (bin_dir / "scontrol").chmod(0o755)
    env = clean_env(tmp_path)
    env.update(SLURM_JOB_ID=job_id, SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NAME="train", SLURM_NODELIST="node001",
               SCONTROL_LOG=str(tmp_path / "scontrol.log"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)
    return env


def _steps_logged(run_dir: Path) -> list[int]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return [int(r["step"]) for r in rows if r.get("train/loss_step")]


def test_sigusr1_mid_epoch_saves_requeues_and_the_requeued_job_ends_like_an_uninterrupted_run(tmp_path,
                                                                                               uninterrupted_run):
    """A SLURM job (simulated: its variables, a fake scontrol) of 2 epochs x 3 batches gets SIGUSR1 in the middle of
    step 4 (epoch 1's second batch): it finishes that step, writes last.ckpt at step 5 (no hpc_ckpt of Lightning's
    auto-requeue), runs `scontrol requeue <job>` once, logs it in one line and exits 138. The same command as the
    requeued job (SLURM_RESTART_COUNT=1) resumes from that file by itself, trains only epoch 1's third batch (from the
    train loader's saved place, without Lightning's warning about a non-resumable loader) and ends with the weights,
    Adam moments and per-step losses of the uninterrupted run, each step logged once in the run's metrics.csv."""
    out, marker = tmp_path / "out", tmp_path / "marker"
    cmd = [sys.executable, "-m", "diffusion.train", *RESUME_RUN, "trainer.max_epochs=2", f"hydra.run.dir={out}"]
    wait = ["+callbacks.wait._target_=tests.helpers.WaitForSignalAtStep", "+callbacks.wait.step=4",
            f"+callbacks.wait.marker={marker}"]
    env = _slurm_env(tmp_path, "4242")
    proc = subprocess.Popen([*cmd, *wait], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        output = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    lines = [line for line in output.splitlines() if "preempted by" in line]
    assert len(lines) == 1 and lines[0].endswith(f"preempted by SIGUSR1 at step 5: saved {last}; requeued SLURM job "
                                                 "4242, which resumes from it"), output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 5 and saved["slurm_job_id"] == "4242"
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert not list(out.glob("hpc_ckpt*")), "Lightning's own auto-requeue saved too"
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                             timeout=300, check=False)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"requeued SLURM job 4242 (restart 1): resuming from {last}" in output
    assert "not resumable" not in output, "Lightning found the train loader not resumable"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (uninterrupted_run / "checkpoints").iterdir())
    assert_same_training(uninterrupted_run, out, from_step=0)
    assert _steps_logged(out) == _steps_logged(uninterrupted_run) == list(range(6))


# ----------------------------------------------------------------------------------------------- in-process
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE",
              "SLURM_NNODES")


@pytest.fixture
def slurm(monkeypatch):
    """Set the SLURM variables of one test (all others removed)."""
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)

    def set_(**env):
        for key in SLURM_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return set_


def test_only_a_restart_of_the_job_that_wrote_last_ckpt_continues_a_used_directory(tmp_path, slurm):
    """The requeued job (same id, SLURM_RESTART_COUNT >= 1) gets ckpt_path = its own last.ckpt, also over a
    ckpt_path it was started with; every other run into that directory is refused in one line naming why."""
    from omegaconf import OmegaConf

    from diffusion.run.errors import UsageError
    from diffusion.run.outputs import check_resume_and_outputs

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 5, "slurm_job_id": "4242"}, last)
    start = tmp_path / "start.ckpt"
    start.write_bytes(b"x")

    def check(ckpt_path=None):
        cfg = OmegaConf.create({"ckpt_path": ckpt_path, "paths": {"output_dir": str(out)}})
        return check_resume_and_outputs(cfg), cfg

    slurm(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    for given in (None, str(start)):
        resumed, cfg = check(given)
        assert resumed == last and cfg.ckpt_path == str(last)

    refusals = {
        "4243 restarted": ({"SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "1"},
                           "its last.ckpt was written by SLURM job 4242, not by this job (4243)"),
        "4242 first start": ({"SLURM_JOB_ID": "4242"}, "SLURM_RESTART_COUNT says this is not a requeued start"),
        "array task": ({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
                        "SLURM_RESTART_COUNT": "1"}, "not by this job (4240_2)"),
        "outside SLURM": ({}, "to continue that run pass ckpt_path=<its last.ckpt>"),
    }
    for case, (env, why) in refusals.items():
        slurm(**env)
        with pytest.raises(UsageError) as err:
            check()
        message = str(err.value)
        assert "already holds checkpoints" in message and why in message and "\n" not in message, (case, message)
    assert "requeued SLURM job" not in message, "outside SLURM the refusal is the one it always was"

    slurm(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    torch.save({"global_step": 5}, last)  # a checkpoint from before this feature, or from outside SLURM
    with pytest.raises(UsageError, match=r"written by a run outside SLURM, not by this job \(4242\)"):
        check()


def test_a_requeued_job_whose_run_directory_holds_no_checkpoint_says_it_starts_over(tmp_path, slurm, caplog):
    """A run directory named by the start time (the default ${now:}) is a new one after a requeue: the job warns."""
    from omegaconf import OmegaConf

    from diffusion.run.outputs import check_resume_and_outputs

    cfg = OmegaConf.create({"ckpt_path": None, "paths": {"output_dir": str(tmp_path / "new")}})
    slurm(SLURM_JOB_ID="4242")
    assert check_resume_and_outputs(cfg) is None and not caplog.records
    slurm(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2")
    assert check_resume_and_outputs(cfg) is None
    expected = (f"SLURM job 4242 was requeued (restart 2) but its run directory {tmp_path / 'new'} holds no checkpoint: "
                "training starts from the beginning (the run directory must not depend on the start time: "
                "hydra.run.dir=<one per job>)")
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_under_slurm_lightning_gets_its_slurm_environment_with_auto_requeue_off(tmp_path, slurm, monkeypatch):
    """Lightning's own SIGUSR1 handler (a mid-step hpc_ckpt save) is never installed; the configured plugins stay."""
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from diffusion.run.requeue import lightning_requeue_off
    from diffusion.training.checkpointing import AtomicCheckpointIO
    from tests.test_config import compose_cfg

    cfg = compose_cfg("trainer.accelerator=cpu")
    assert lightning_requeue_off(cfg.trainer) == {}, "outside SLURM nothing changes"
    slurm(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
          SLURM_JOB_NAME="train")
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                          **lightning_requeue_off(cfg.trainer))
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is before, "Lightning installed its auto-requeue handler"
    finally:
        trainer._signal_connector.teardown()
    # torchrun started inside the SLURM job (srun torchrun ...): Lightning must take torchrun's ranks, not SLURM's
    for key, value in dict(TORCHELASTIC_RUN_ID="x", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", GROUP_RANK="0",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect() and lightning_requeue_off(cfg.trainer) == {}


def _trainer(batches=3, epoch=0, max_epochs=2, step=4, accumulate=1):
    from types import SimpleNamespace

    return SimpleNamespace(num_training_batches=batches, accumulate_grad_batches=accumulate, world_size=1,
                           max_steps=-1, max_epochs=max_epochs, current_epoch=epoch, global_step=step,
                           is_global_zero=True, _signal_connector=SimpleNamespace(received_sigterm=False))


def test_the_stop_waits_for_the_step_its_validation_and_the_optimizer_step_and_not_at_the_last_step():
    """The stop is Lightning's SIGTERM flag, set after the batch: held back while the validation that follows the
    batch runs (Lightning would cut it after one batch), never at a batch whose gradients are only accumulated, and
    not at all at the run's last step (the run finishes)."""
    from diffusion.training.resumable import ResumableRun

    run, trainer = ResumableRun(), _trainer()
    run.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer._signal_connector.received_sigterm, "no signal, no stop"
    run._on_signal(signal.SIGUSR1, None)
    run.on_train_batch_end(trainer, None, None, None, 2)  # epoch 0's last batch: its validation follows
    assert trainer._signal_connector.received_sigterm and run._stopping == signal.SIGUSR1
    run.on_validation_start(trainer, None)
    assert not trainer._signal_connector.received_sigterm, "the validation would stop after its first batch"
    run.on_validation_end(trainer, None)
    assert trainer._signal_connector.received_sigterm

    run, trainer = ResumableRun(), _trainer(batches=4, accumulate=2)
    run._on_signal(signal.SIGUSR2, None)
    run.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer._signal_connector.received_sigterm, "stopped between the accumulated batches"
    run.on_train_batch_end(trainer, None, None, None, 1)
    assert trainer._signal_connector.received_sigterm and run._stopping == signal.SIGUSR2

    run, trainer = ResumableRun(), _trainer(epoch=1)
    run._on_signal(signal.SIGUSR1, None)
    run.on_train_batch_end(trainer, None, None, None, 2)  # the last batch of the last epoch
    assert not trainer._signal_connector.received_sigterm and run._stopping is None


def test_under_submitit_its_handler_requeues_after_the_save(tmp_path, slurm, monkeypatch):
    """The handler that was installed before training (submitit's, under its launcher) is called after the save in
    place of scontrol; the exit status it chooses (submitit's local requeue code, say) is the process's."""
    from diffusion.training.resumable import ResumableRun

    slurm(SLURM_JOB_ID="4242")
    env = _slurm_env(tmp_path, "4242")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("SCONTROL_LOG", env["SCONTROL_LOG"])
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(3)

    run = ResumableRun()
    run._previous[signal.SIGUSR2] = submitit_handler
    assert run._hand_over(signal.SIGUSR2, "SIGUSR2", 5, "last.ckpt") == 3 and calls == [signal.SIGUSR2]
    assert not (tmp_path / "scontrol.log").exists()
    assert run._hand_over(signal.SIGUSR1, "SIGUSR1", 5, "last.ckpt") is None  # no earlier handler: scontrol
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGNOPE"], [1]])
def test_bad_requeue_signals_are_refused(signals):
    from diffusion.training.resumable import ResumableRun

    with pytest.raises(ValueError, match=r"callbacks.resumable.requeue_signals=.* is invalid: it must be a list of "
                                         "signal names"):
        ResumableRun(requeue_signals=signals)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """The outputs of the tasks once they exit; all are killed if one of them runs past ``timeout`` (a hung rank)."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _srun(tmp_path: Path, overrides: list[str], job_id: str, **extra: str) -> list[subprocess.Popen]:
    """Two SLURM tasks of one node (as ``srun --ntasks-per-node=2`` starts them): DDP ranks 0 and 1, gloo."""
    port, procs = str(_free_port()), []
    for rank in (0, 1):
        env = _slurm_env(tmp_path, job_id, **extra)
        env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "diffusion.train", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


@pytest.mark.slow
def test_ddp_two_slurm_tasks_a_signal_on_one_rank_stops_both_and_the_requeued_job_ends_like_an_uninterrupted_one(
        tmp_path):
    """Two SLURM tasks (gloo): SIGUSR1 reaches only rank 1 in the middle of step 4; both ranks stop after it, rank 0
    writes last.ckpt and runs scontrol once, both exit 138; the requeued job (both tasks) ends with the weights and
    losses of an uninterrupted two-task job. (~3 min on 2 cores.)"""
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", *RESUME_RUN, "trainer.max_epochs=2"]
    ref, out, marker = tmp_path / "ref", tmp_path / "out", tmp_path / "marker"
    procs = _srun(tmp_path, [*ddp, f"hydra.run.dir={ref}"], "4300")
    outputs = _finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    wait = ["+callbacks.wait._target_=tests.helpers.WaitForSignalAtStep", "+callbacks.wait.step=4",
            f"+callbacks.wait.marker={marker}", "+callbacks.wait.timeout=5"]
    procs = _srun(tmp_path, [*ddp, *wait, f"hydra.run.dir={out}"], "4343")
    deadline = time.monotonic() + 300
    while not marker.exists():
        if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
            _finish(procs, 1)
            pytest.fail("the job never reached step 4")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    outputs = _finish(procs, 300)
    assert [p.returncode for p in procs] == [138, 138], outputs[0][-2000:] + outputs[1][-2000:]
    assert "requeued SLURM job 4343" in outputs[0] and "preempted by" not in outputs[1]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4343\n"
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5

    procs = _srun(tmp_path, [*ddp, f"hydra.run.dir={out}"], "4343", SLURM_RESTART_COUNT="1")
    outputs = _finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_training(ref, out, from_step=0)


def test_the_requeue_line_says_what_happened_without_slurm_and_when_scontrol_fails(tmp_path, slurm, monkeypatch,
                                                                                 caplog):
    from diffusion.training.resumable import ResumableRun

    run = ResumableRun()
    assert run._hand_over(signal.SIGUSR1, "SIGUSR1", 5, "/r/last.ckpt") is None
    slurm(SLURM_JOB_ID="4242")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (bad / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bad}{os.pathsep}{os.environ['PATH']}")
    assert run._hand_over(signal.SIGUSR1, "SIGUSR1", 5, "/r/last.ckpt") is None
    failed = ("preempted by SIGUSR1 at step 5: saved /r/last.ckpt, but SLURM job 4242 was not requeued (`scontrol "
              "requeue 4242` exited with 1: Invalid job id specified); resume with ckpt_path=/r/last.ckpt")
    assert [r.getMessage() for r in caplog.records] == [
        "interrupted by SIGUSR1 at step 5; resume with ckpt_path=/r/last.ckpt", failed]
