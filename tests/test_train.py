"""The training CLI as a user runs it: Hydra overrides, errors, sweeps, DDP, W&B offline, checkpoints and resume."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from diffusion.models import UNet
from diffusion.training.module import DiffusionModule
from tests.conftest import FAST, RESUME_RUN, assert_same_training, snapshot
from tests.wandb_records import config, history, records

PROBE = "+callbacks.probe._target_=tests.helpers.RankProbe"
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def test_fast_dev_run_exits_zero(train_cli, tmp_path):
    proc = train_cli("trainer.fast_dev_run=true", "module.num_samples=4", "sampler.num_steps=3", "logger=none", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 0, proc.output[-3000:]
    assert (tmp_path / "o" / "samples" / "final.png").stat().st_size > 0


def test_readme_override_example_reaches_the_unet(train_cli, tmp_path):
    # base_channels=384 on the digits default's 1-2-4 levels would be ~576M parameters: two levels keep it small
    proc = train_cli(
        "schedule=cosine", "model.base_channels=384", "model.channel_mult=[1,1]", "model.num_res_blocks=1",
        "model.attention_resolutions=[8]", "trainer.fast_dev_run=true", "data.batch_size=2",
        "module.num_samples=1", "sampler.num_steps=2", "logger=none", f"hydra.run.dir={tmp_path / 'o'}",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    expected = sum(p.numel() for p in UNet(in_channels=1, image_size=16, base_channels=384, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(8,)).parameters())
    logged = float(re.search(r"UNet: ([\d.]+)M parameters", proc.output).group(1))
    assert logged == pytest.approx(expected / 1e6, abs=0.01)
    config = yaml.safe_load((tmp_path / "o" / ".hydra" / "config.yaml").read_text())
    assert config["schedule"]["_target_"].endswith("CosineSchedule")


@pytest.mark.parametrize(
    "override, text",
    [("schedule=nope", "nope"), ("schedule.T=0", "T=0"), ("model.base_channels=-1", "base_channels=-1"), ("data.batch_size=0", "batch_size=0")],
)
def test_bad_override_fails_fast_with_one_line(train_cli, tmp_path, override, text):
    proc = train_cli(override, "logger=none", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.output
    lines = [line for line in proc.output.splitlines() if text in line]
    assert lines, proc.output[-2000:]
    if override != "schedule=nope":  # ours: exactly one 'error:' line; Hydra's own lists the available options
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and text in errors[0]
    assert not (tmp_path / "o" / "checkpoints").exists(), "nothing may be trained before the error"
    assert "Epoch" not in proc.output


def test_multirun_writes_one_directory_per_combination(train_cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", "schedule.T=20,40", "schedule.beta_end=0.05,0.1", *FAST, "logger=none", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.output[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4
    combos = set()
    for job in jobs:
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        combos.add((cfg["schedule"]["T"], cfg["schedule"]["beta_end"]))
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "samples" / "final.png").is_file()
    assert combos == {(20, 0.05), (20, 0.1), (40, 0.05), (40, 0.1)}


def _probes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe_rank*.json"))]


def test_ddp_two_cpu_ranks(train_cli, tmp_path):
    out = tmp_path / "o"
    proc = train_cli(*DDP, *FAST, "logger=none", PROBE, f"hydra.run.dir={out}", f"paths.log_dir={tmp_path / 'logs'}")
    assert proc.returncode == 0, proc.output[-3000:]
    probes = _probes(out)
    assert [p["global_rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
    assert probes[0]["ema_hash"] == probes[1]["ema_hash"], "EMA weights differ between ranks"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert not (tmp_path / "logs").exists(), "a rank wrote a run directory of its own"


def test_sweep_with_ddp_runs_each_job_once_on_two_ranks(train_cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m", "schedule.T=100,200", *DDP, *FAST, "logger=none", PROBE,
        f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"], "exactly 2 runs: DDP ranks must not start sweeps of their own"
    for job, T in zip(jobs, [100, 200]):
        probes = _probes(job)
        assert [p["global_rank"] for p in probes] == [0, 1]
        assert all(p["world_size"] == 2 and p["T"] == T for p in probes)
        assert probes[0]["ema_hash"] == probes[1]["ema_hash"]
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "logs").exists()
    assert proc.output.count("Launching") <= 2


def test_wandb_offline_run_holds_loss_history_and_images(finished_run):
    out, proc = finished_run
    assert proc.output.count("W&B: no login found, logging offline") == 1
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    rows = history(next(run_dirs[0].glob("run-*.wandb")))
    assert len(rows["train/loss_step"]) == 4 and all(v > 0 for v in rows["train/loss_step"])
    assert len(rows["val/loss"]) == 2
    assert {f"train/loss_q{q}" for q in range(4)} <= set(rows)
    assert "lr-AdamW" in rows
    logged = config(next(run_dirs[0].glob("run-*.wandb")))
    assert logged["schedule"]["T"] == 1000 and logged["model"]["base_channels"] == 8


def test_wandb_sample_images_are_the_saved_grids_at_their_step(finished_run):
    """Each W&B sample image (2 epochs + final) is, pixel for pixel, ``samples/<its name>.png``, logged at the global
    step it was drawn at (2 training batches an epoch), captioned with its epoch, step and sampler."""
    import numpy as np
    from PIL import Image

    out, _ = finished_run
    run = next((out / "wandb").glob("offline-run-*"))
    logged = [r for r in records(next(run.glob("run-*.wandb"))) if "samples/filenames" in r]
    expected = {"epoch_0000": (2, "epoch 0, step 2"), "epoch_0001": (4, "epoch 1, step 4"),
                "final": (4, "end of training, 2 epochs, step 4")}
    assert sorted(r["samples/captions"][0].split(":")[0] for r in logged) == sorted(expected)
    for record in logged:
        caption, (media,) = record["samples/captions"][0], record["samples/filenames"]
        name = caption.split(":")[0]
        step, when = expected[name]
        assert record["trainer/global_step"] == step and when in caption and "ddim, 3 steps, eta 0" in caption, caption
        saved = np.asarray(Image.open(out / "samples" / f"{name}.png"))
        assert saved.shape == (4 * (2 * 18 + 2),) * 2 and saved.max() == 255  # 4 digits, enlarged 4 x
        assert np.array_equal(np.asarray(Image.open(run / "files" / media)), saved), name


def test_final_grid_is_the_checkpoints_samples_enlarged(finished_run):
    """samples/final.png holds the EMA weights' 4 samples drawn with the run's seed, each pixel as a 4 x 4 block."""
    import numpy as np
    from PIL import Image

    out, _ = finished_run
    module = DiffusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")  # EMA weights, as the final grid
    images = module.sample(4, generator=torch.Generator().manual_seed(module.hparams.seed)).samples
    grid = np.asarray(Image.open(out / "samples" / "final.png")).astype(int)
    for k in range(4):
        top, left = 4 * (2 + (k // 2) * 18), 4 * (2 + (k % 2) * 18)
        pixels = ((images[k, 0].double().clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)
        assert np.array_equal(grid[top : top + 64, left : left + 64], np.kron(pixels, np.ones((4, 4), dtype=int))), k


def test_checkpoint_samples_without_its_config(finished_run):
    out, _ = finished_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt, "the EMA callback stores the raw weights beside the EMA state_dict"
    assert any(not torch.equal(ckpt["state_dict"][k], v) for k, v in ckpt["current_model_state"].items() if k.startswith("model."))
    module = DiffusionModule.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.process.betas.shape == (1000,)
    g = torch.Generator().manual_seed(0)
    images = module.sample(2, sampler=module.build_sampler(module.hparams.sampler, num_steps=3), generator=g).samples
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_a_refused_run_changes_nothing_in_the_used_directory(finished_run, train_cli):
    """A second run into a used directory stops, and every file there (checkpoints, .hydra/config.yaml and
    overrides.yaml, train.log, W&B files) is as it was: the config beside the checkpoints is still the one that
    made them."""
    out, _ = finished_run
    before = snapshot(out)
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before
    proc = train_cli(*FAST, "logger=none", "schedule.T=10", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    assert snapshot(out) == before
    assert yaml.safe_load((out / ".hydra" / "config.yaml").read_text())["schedule"]["T"] == 1000


def test_missing_resume_checkpoint_is_reported(train_cli, tmp_path):
    proc = train_cli(*FAST, "logger=none", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "nope.ckpt" in proc.stderr and "Traceback" not in proc.output


def test_resume_continues_exactly_like_an_uninterrupted_run(train_cli, tmp_path, uninterrupted_run):
    b1, b2 = tmp_path / "b1", tmp_path / "b2"
    assert train_cli(*RESUME_RUN, "trainer.max_epochs=1", f"hydra.run.dir={b1}").returncode == 0
    proc = train_cli(*RESUME_RUN, "trainer.max_epochs=2", f"ckpt_path={b1 / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={b2}")
    assert proc.returncode == 0, proc.output[-3000:]
    assert_same_training(uninterrupted_run, b2, from_step=3)


@pytest.mark.slow
def test_default_digits_run_learns(train_cli, tmp_path):
    """The README's main job, as is (CSV logger to read the curve): validation loss must fall clearly."""
    out = tmp_path / "o"
    proc = train_cli("logger=csv", f"hydra.run.dir={out}", timeout=3000)  # ~10 min alone on 2 cores
    assert proc.returncode == 0, proc.output[-3000:]
    import csv

    val = [float(r["val/loss"]) for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    assert len(val) >= 10 and val[-1] < 0.7 * val[0], val
    assert (out / "samples" / "final.png").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_agree_on_one_run_directory(tmp_path):
    """torchrun --nnodes 2 (one process each, rendezvous on 127.0.0.1, gloo), the nodes started seconds apart:
    every rank resolves the same run directory (``${now:}`` alone would give each its own), both train, the EMA
    weights are equal, and only global rank 0 writes the checkpoints and the config."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, clean_env

    logs, port = tmp_path / "logs", _free_port()
    overrides = [*FAST, "logger=none", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
                 "trainer.strategy=ddp", PROBE, f"paths.log_dir={logs}"]

    # torchrun starts both workers together once the nodes have met, so the clock alone could give them the same
    # second: global rank 1's worker waits 2 s before it runs (a sitecustomize on its path), so that each rank's own
    # ${now:} is another second and only the shared stamp can make them agree
    delay = tmp_path / "delay"
    delay.mkdir()
    (delay / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('TORCHELASTIC_RUN_ID') and os.environ.get('RANK') == '1':\n    time.sleep(2.0)\n")

    def node(rank: int):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node",
               "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "diffusion.train", *overrides]
        env = clean_env(tmp_path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(delay), env.get("PYTHONPATH")) if p)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    second = node(1)
    time.sleep(1.0)  # the other node starts later
    first = node(0)
    outputs = [p.communicate(timeout=240)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs[0][-3000:] + outputs[1][-3000:]
    runs = list((logs / "train").iterdir())
    assert len(runs) == 1, f"the ranks wrote {len(runs)} run directories: {runs}"
    probes = _probes(runs[0])
    assert [p["global_rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
    assert probes[0]["ema_hash"] == probes[1]["ema_hash"], "EMA weights differ between the nodes"
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert yaml.safe_load((runs[0] / ".hydra" / "config.yaml").read_text())["trainer"]["num_nodes"] == 2
