"""Faults and interruptions lose no work: last.ckpt is the latest epoch, a NaN loss stops the run, checkpoints are
written atomically (a full disk leaves the previous one), SIGTERM saves and exits 143, and a resumed run keeps its
best score and its W&B run."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusion.run.errors import TrainingFault, exits_on_usage_error
from diffusion.training import checkpointing
from diffusion.training.checkpointing import AtomicCheckpointIO, ModelCheckpoint
from diffusion.training.ema import EMA
from diffusion.training.finite_loss import FiniteLoss
from tests.conftest import FAST, REPO, clean_env

QUIET = ["module.sample_every_n_epochs=0", "final_samples=false"]
BY_EPOCH = "callbacks.model_checkpoint.monitor=epoch"  # mode=min: epoch 0 stays the best, every later epoch is worse
EVERY_EPOCH = "callbacks.model_checkpoint.every_n_epochs=1"  # the default saves every 5 epochs and at the last


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _checkpoint_state(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))


def _finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for key in ("state_dict", "current_model_state")
               for v in ckpt[key].values() if v.is_floating_point())


def test_a_nan_loss_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(train_cli, tmp_path):
    """Item 11: the weights turn NaN before step 3 (epoch 1, 2 steps per epoch): the run stops there with exit 1 and
    one line naming the step; last.ckpt is still epoch 0's (step 2, finite); no final grid or metrics.json."""
    out = tmp_path / "o"
    proc = train_cli(*FAST, "trainer.max_epochs=2", "logger=none", "final_samples=true", EVERY_EPOCH,
                     "+callbacks.nan._target_=tests.helpers.NaNAtStep", "+callbacks.nan.step=3", f"hydra.run.dir={out}")
    assert proc.returncode == 1, proc.output[-3000:]
    assert "Traceback" not in proc.output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is nan at step 3" in errors[0], proc.stderr[-2000:]
    assert str(out / "checkpoints" / "last.ckpt") in errors[0]
    last = _load(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and _finite(last)
    assert not (out / "samples" / "final.png").exists() and not (out / "metrics.json").exists()


def test_checkpoints_come_every_n_epochs_and_at_the_last_one(train_cli, tmp_path):
    """every_n_epochs=2 over 3 epochs of 2 steps, monitoring the epoch (mode min: the earliest checked is best): the
    best-so-far check and last.ckpt come at epoch 1 and at the last epoch 2 (not a multiple of 2), never at epoch 0."""
    out = tmp_path / "o"
    proc = train_cli(*FAST, *QUIET, BY_EPOCH, "trainer.max_epochs=3", "logger=none",
                     "callbacks.model_checkpoint.every_n_epochs=2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.output[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]
    assert _load(out / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert _load(out / "checkpoints" / "best-epoch001.ckpt")["global_step"] == 4


def _wait_for(condition, proc, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_saves_and_exits_143_last_ckpt_follows_every_epoch_and_resume_keeps_best_and_wandb_run(tmp_path):
    """One run of 2-step epochs whose monitored value only gets worse after epoch 0 (W&B offline):
    item 9: last.ckpt is rewritten at the end of a later epoch although epoch 0 stays the best (Lightning 2.6 alone
    leaves it at step 2); item 13: SIGTERM then exits 143 with 'interrupted at step N; resume with ckpt_path=<path>', and
    that file holds step N; item 8: resumed from it into a new directory, the run continues the same W&B run
    (offline: a new offline-run-*-<same id> folder) and the earlier best stays the best (Lightning alone made the
    next, worse epoch "best")."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*FAST, *QUIET, BY_EPOCH, EVERY_EPOCH]  # W&B (offline) logger: the default
    last = a / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "diffusion.train", *common, "trainer.max_epochs=1000", f"hydra.run.dir={a}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(last.exists, proc, "the first epoch's last.ckpt")
        first = last.stat().st_ino  # every write replaces the file (a new inode)
        _wait_for(lambda: last.stat().st_ino != first, proc, "last.ckpt of a later epoch (is it ever rewritten?)")
        epoch1 = _load(last)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert epoch1["epoch"] >= 1 and epoch1["global_step"] == 2 * (epoch1["epoch"] + 1), "last.ckpt is not an epoch's end"
    best = a / "checkpoints" / "best-epoch000.ckpt"
    assert _load(best)["global_step"] == 2

    assert proc.returncode == 143, output[-3000:]
    match = re.search(r"interrupted at step (\d+); resume with ckpt_path=(\S+)", output)
    assert match, output[-3000:]
    step, path = int(match.group(1)), Path(match.group(2))
    assert path == last
    interrupted = _load(path)
    assert interrupted["global_step"] == step >= 4 and _finite(interrupted)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"], "a temporary file was left"
    (run_a,) = (a / "wandb").glob("offline-run-*")
    run_id = run_a.name.rsplit("-", 1)[-1]
    assert interrupted["wandb_run_id"] == run_id

    epochs = interrupted["epoch"] + 2
    resumed = subprocess.run([sys.executable, "-m", "diffusion.train", *common, f"trainer.max_epochs={epochs}",
                              f"ckpt_path={path}", f"hydra.run.dir={b}"],
                             cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    (run_b,) = (b / "wandb").glob("offline-run-*")
    assert run_b.name.endswith(f"-{run_id}"), f"{run_b.name} does not continue W&B run {run_id}"
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["last.ckpt"], "a worse epoch was saved as best"
    final = _load(b / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * epochs and final["wandb_run_id"] == run_id
    state = _checkpoint_state(final)
    assert float(state["best_model_score"]) == 0.0 and state["best_model_path"] == str(best)
    assert best.is_file(), "the earlier run's best file must stay"


# ----------------------------------------------------------------------------------------------- in-process
def _checkpoint(value: float, n: int = 20_000) -> dict:
    return {"global_step": 1, "state_dict": {"model.w": torch.full((n,), value)}, "current_model_state": {"model.w": torch.zeros(n)}}


class _FullDisk:
    """A file on a disk that fills up after ``room`` bytes: the bytes up to there are written, then ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        self.f.write(data[: self.room])
        if len(data) > self.room:
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_leaves_the_previous_checkpoint_byte_for_byte(tmp_path, monkeypatch):
    """Item 12: the write of a new last.ckpt fails with ENOSPC after 4 KiB: one-line error naming the file, the old
    file's bytes unchanged, no temporary file left; the next write (disk freed) replaces it whole."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpointing, "open", lambda file, mode="r": _FullDisk(open(file, mode), room=4096), raising=False)
    with pytest.raises(TrainingFault) as err:
        io.save_checkpoint(_checkpoint(2.0), path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and os.strerror(errno.ENOSPC) in message, message
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.ckpt"], "a temporary file was left"
    monkeypatch.undo()
    io.save_checkpoint(_checkpoint(2.0), path)
    assert torch.equal(_load(path)["state_dict"]["model.w"], torch.full((20_000,), 2.0))


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    before = path.read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrainingFault, match=r"state_dict\.model\.w is not finite"):
            io.save_checkpoint(_checkpoint(bad), path)
    raw_nan = _checkpoint(1.0)
    raw_nan["current_model_state"]["model.w"][7] = float("nan")
    with pytest.raises(TrainingFault, match=r"current_model_state\.model\.w is not finite"):
        io.save_checkpoint(raw_nan, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("trainer", ["default", "ddp"])
def test_the_trainer_config_writes_every_checkpoint_through_the_atomic_writer(trainer, tmp_path):
    from hydra.utils import instantiate

    from tests.test_config import compose_cfg

    cfg = compose_cfg(f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2" if trainer == "ddp" else "trainer.devices=1")
    built = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def _fake_trainer(step: int):
    return SimpleNamespace(global_step=step, strategy=SimpleNamespace(all_gather=lambda t: t), checkpoint_callback=None,
                           ckpt_path=None, sanity_checking=False)


@pytest.mark.parametrize("every, raised_at", [(1, 2), (4, 3)])
def test_finite_loss_names_the_first_bad_step_whenever_it_checks(every, raised_at):
    """The flag is kept on the device; read every step (1) or every 4 steps it names step 2, the first NaN."""
    guard = FiniteLoss(check_every_n_steps=every)
    losses = [1.0, 2.0, float("nan"), float("inf"), 3.0]
    with pytest.raises(TrainingFault, match=r"^loss is nan at step 2: .*no checkpoint had been written$"):
        for step, loss in enumerate(losses):
            trainer = _fake_trainer(step)
            guard.on_train_batch_start(trainer, None, None, step)
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
            assert step < raised_at
    assert step == raised_at
    ok = FiniteLoss(check_every_n_steps=every)
    for step in range(5):
        ok.on_train_batch_start(_fake_trainer(step), None, None, step)
        ok.on_train_batch_end(_fake_trainer(step), None, {"loss": torch.tensor(1.0)}, None, step)
    ok.on_train_end(_fake_trainer(5), None)


def test_an_interrupted_validation_puts_the_raw_weights_back_before_saving():
    """SIGTERM during validation stops it with the EMA weights swapped into the model; the EMA callback swaps back
    (once, whichever callback asks first), so a checkpoint saved then holds raw weights as raw and EMA as EMA."""
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Linear(3, 1)
    ema = EMA(decay=0.9)
    ema._average_model = AveragedModel(model)
    with torch.no_grad():
        ema._average_model.module.weight.fill_(5.0)
    raw = model.weight.detach().clone()
    ema.on_validation_epoch_start(None, model)
    assert torch.all(model.weight == 5.0)
    ema.restore_training_weights(model)
    ema.on_exception(None, model, KeyboardInterrupt())
    assert torch.equal(model.weight, raw) and torch.all(ema._average_model.module.weight == 5.0)


def test_a_training_fault_is_one_line_and_exit_status_1(capsys):
    @exits_on_usage_error
    def cli():
        raise TrainingFault("loss is nan at step 3: training stopped")

    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: loss is nan at step 3: training stopped\n"


def test_save_last_link_is_refused():
    with pytest.raises(ValueError, match="save_last='link' is invalid"):
        ModelCheckpoint(dirpath="x", save_last="link")
