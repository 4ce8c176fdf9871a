"""Bad inputs and unusable files get one line naming the value and what is allowed, before any work (issue #12,
item 14): resume checkpoints (truncated, text, another model, already past max_epochs), image folders, batch
sizes, optimizer and trainer values, the run directory, FID without torch-fidelity.

Most checks run in-process on a config composed as the CLI composes it (``train(cfg)`` raises the UsageError the
CLI prints); two subprocesses prove the CLI's side: exit status 2, one ``error:`` line, no traceback. A check
that must come before the data is prepared is run together with a bad data value (``data.batch_size=100000``, more
than the training split, refused when the data is prepared): the message must be about the earlier check.
"""

import os
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import diffusion.data.folder as folder_mod
from diffusion.evaluate import evaluate
from diffusion.run import preflight
from diffusion.run.errors import UsageError, exits_on_usage_error
from diffusion.run.outputs import unusable_dir_reason
from diffusion.train import CONFIG_DIR, build_module, train
from tests.conftest import FAST, run_train

BAD_DATA = "data.batch_size=100000"  # refused when the data is prepared (more than the training split): a check before it must answer first


def compose_cfg(*overrides: str, config_name: str = "config"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def refused(tmp_path, *overrides: str) -> str:
    """Run ``train`` on FAST + overrides; it must refuse with a one-line UsageError before anything is trained."""
    out = tmp_path / "out"
    cfg = compose_cfg(*FAST, "logger=none", f"paths.output_dir={out}", *overrides)
    with pytest.raises(UsageError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists() and not (out / "samples").exists()
    return message


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.output[-3000:]
    assert "Traceback" not in proc.output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


# ----------------------------------------------------------------------------------------------- resume
@pytest.fixture
def broken_checkpoints(ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # what a full disk leaves
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    return {"truncated": truncated, "text": text}


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_resume_from_an_unreadable_checkpoint(broken_checkpoints, tmp_path, kind):
    path = broken_checkpoints[kind]
    message = refused(tmp_path, f"ckpt_path={path}", "trainer.max_epochs=5", BAD_DATA)
    assert f"ckpt_path={path} is not a readable checkpoint" in message and "diffusion.train" in message


def test_resume_from_a_truncated_checkpoint_cli(broken_checkpoints, tmp_path):
    out = tmp_path / "o"
    proc = run_train(*FAST, "logger=none", f"ckpt_path={broken_checkpoints['truncated']}", f"hydra.run.dir={out}", tmp_path=tmp_path)
    line = one_error_line(proc)
    assert f"ckpt_path={broken_checkpoints['truncated']} is not a readable checkpoint" in line
    assert not (out / "checkpoints").exists() and "Epoch" not in proc.output


def test_resume_with_another_model_size_names_the_setting(ckpt, tmp_path):
    """The shared run has base_channels=8: resuming it with 16 is refused before the Trainer, naming both values
    (Lightning's state_dict error, a 40-line traceback, came only inside fit); the same settings pass."""
    message = refused(tmp_path, f"ckpt_path={ckpt}", "trainer.max_epochs=5", "model.base_channels=16")
    assert "model.base_channels=8 there, 16 here" in message and "does not fit" in message
    message = refused(tmp_path, f"ckpt_path={ckpt}", "trainer.max_epochs=5", "schedule.T=100")
    assert "schedule.T=1000 there, 100 here" in message
    same = compose_cfg(*FAST, "logger=none", f"ckpt_path={ckpt}", "trainer.max_epochs=5", f"paths.output_dir={tmp_path}")
    resume = preflight.check_settings(same)
    preflight.check_resume_fits(same, resume, build_module(same, channels=1, image_size=16))  # no error
    # same shapes, other meaning: the checkpoint's betas would silently replace this run's, and an eps network
    # would be trained as a v one
    for override, text in (("schedule.beta_end=0.01", "schedule.beta_end=0.02 there, 0.01 here"),
                           ("process.objective=v", "process.objective='eps' there, 'v' here")):
        other = compose_cfg(*FAST, "logger=none", f"ckpt_path={ckpt}", "trainer.max_epochs=5", override,
                            f"paths.output_dir={tmp_path}")
        with pytest.raises(UsageError, match="keep the tensors' shapes") as err:
            preflight.check_resume_fits(other, resume, build_module(other, channels=1, image_size=16))
        assert text in str(err.value)


def test_resume_past_the_checkpoints_progress(ckpt, tmp_path):
    """The shared run trained 2 epochs: max_epochs 1 or 2 would train nothing (Lightning exits 0 at once), as would
    max_steps at or below its step; the message says what the checkpoint holds and what to pass."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    epochs, step = saved["epoch"] + 1, saved["global_step"]  # written at the end of epoch index 1: 2 epochs, step 4
    assert (epochs, step) == (2, 4)
    for max_epochs in (1, 2):
        message = refused(tmp_path, f"ckpt_path={ckpt}", f"trainer.max_epochs={max_epochs}", BAD_DATA)
        assert f"trainer.max_epochs={max_epochs} is invalid" in message
        assert f"already trained {epochs} epoch(s) (step {step})" in message and f"trainer.max_epochs={epochs + 1}" in message
    message = refused(tmp_path, f"ckpt_path={ckpt}", "trainer.max_epochs=5", f"trainer.max_steps={step}", BAD_DATA)
    assert f"trainer.max_steps={step} is invalid" in message and f"already at step {step}" in message
    for ok in (["trainer.max_epochs=3"], ["trainer.max_epochs=-1"], ["trainer.max_epochs=5", f"trainer.max_steps={step + 1}"]):
        assert preflight.check_settings(compose_cfg(*FAST, f"ckpt_path={ckpt}", *ok, f"paths.output_dir={tmp_path}")) is not None


# ----------------------------------------------------------------------------------------------- data
def test_a_folder_of_unreadable_images(tmp_path):
    root, cache_dir = tmp_path / "images", tmp_path / "cache"
    root.mkdir()
    for name in ("a.png", "b.jpg", "c.webp"):
        (root / name).write_bytes(b"\x89PNG not really an image")
    message = refused(tmp_path, "data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=1",
                      "data.decode_workers=0", "data.num_workers=0", f"data.cache_dir={cache_dir}")
    assert f"data root={root} is invalid: none of its 3 image files could be read" in message
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "nothing may be cached"


def test_batch_size_larger_than_the_training_split(tmp_path):
    """The training loader drops the last incomplete batch: with a batch larger than the split it yields none and
    Lightning trains nothing. 1797 digits, val_fraction 0.1: 1617 training images."""
    message = refused(tmp_path, "data.batch_size=1618")
    assert "data batch_size=1618 is invalid: the training split holds only 1617 images" in message
    assert "data.batch_size=<at most 1617>" in message


def test_batch_size_larger_than_a_folder_is_refused_before_decoding(tmp_path, monkeypatch):
    root, cache_dir = tmp_path / "images", tmp_path / "cache"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")

    def no_decoding(*args):
        raise AssertionError("an image was decoded before the batch size was checked")

    monkeypatch.setattr(folder_mod, "decode_image", no_decoding)
    message = refused(tmp_path, "data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=8",
                      "data.val_fraction=0.25", f"data.cache_dir={cache_dir}")
    assert "data batch_size=8 is invalid: the training split holds only 3 images" in message
    assert not cache_dir.exists()


# ----------------------------------------------------------------------------------------------- optimizer, trainer
@pytest.mark.parametrize("override, text", [
    ("optimizer.lr=nan", "optimizer.lr=nan is invalid: it must be a finite number > 0"),
    ("optimizer.lr=-1", "optimizer.lr=-1 is invalid: it must be a finite number > 0"),
    ("optimizer.lr=0", "optimizer.lr=0 is invalid"),
    ("+optimizer.betas=[2.0,0.999]", "optimizer torch.optim.AdamW: Invalid beta parameter at index 0: 2.0"),
    ("trainer.devices=0", "trainer.devices=0 is invalid: it must be a positive number of devices, -1 or auto"),
    ("trainer.devices=[]", "trainer.devices=[] is invalid"),
])
def test_bad_optimizer_or_devices_refused_before_the_data(tmp_path, override, text):
    assert text in refused(tmp_path, override, BAD_DATA)


def test_good_devices_pass():
    for devices in (1, 2, "auto", "2"):
        preflight.check_devices(devices, "cpu")
    for devices in (-1, "auto", [0], "0,1"):  # GPU indices and "all of them" (no count to compare with the machine's)
        preflight.check_devices(devices, "gpu")


@pytest.mark.parametrize("devices", [-1, [0], "0,1"])
def test_gpu_only_devices_are_refused_on_the_cpu(devices):
    """Lightning's CPU accelerator takes a process count only; it would refuse these after the data and model."""
    with pytest.raises(preflight.UsageError, match=r"trainer.devices=.* is invalid on the CPU: it must be a positive"):
        preflight.check_devices(devices, "cpu")


# ----------------------------------------------------------------------------------------------- run directory
def test_run_dir_that_cannot_be_created_cli(tmp_path):
    """Hydra creates hydra.run.dir before the task starts: under a regular file that fails for root too (CI runs
    as root, for whom chmod changes nothing). The callback in conf/hydra refuses it first, in one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_train("logger=none", f"hydra.run.dir={blocker}/run", tmp_path=tmp_path)
    line = one_error_line(proc)
    assert f"hydra.run.dir={blocker}/run cannot be used: {blocker} is a file, not a folder" in line
    assert blocker.read_text() == "x"


def test_unwritable_folders_are_named(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    assert unusable_dir_reason(tmp_path / "new" / "run") is None and unusable_dir_reason(tmp_path) is None
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and os.fspath(p) != str(tmp_path / "ro"))
    assert unusable_dir_reason(tmp_path / "ro" / "a" / "b") == f"{tmp_path / 'ro'} is not writable (permission denied or a read-only file system)"


def test_a_permission_error_is_one_line(capsys):
    @exits_on_usage_error
    def main():
        raise PermissionError(13, "Permission denied", "/data_cache/digits.npy")

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: permission denied on /data_cache/digits.npy")


# ----------------------------------------------------------------------------------------------- FID
def test_fid_weights_without_torch_fidelity(ckpt, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"weights")
    out = tmp_path / "out"
    cfg = compose_cfg(f"ckpt={ckpt}", "metrics=[fid]", f"fid.weights={weights}", f"paths.output_dir={out}", config_name="evaluate")
    with pytest.raises(UsageError) as info:
        evaluate(cfg)
    message = str(info.value)
    assert "\n" not in message and f"fid.weights={weights} needs torch-fidelity" in message and "pip install" in message
    assert not (out / "results.json").exists()
