import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# pytest-xdist (pyproject's addopts: one worker per core): each worker and the runs it starts compute on one thread,
# so that two workers never fight over the cores with OpenMP's spinning threads (a 30 s test took 150 s that way)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Small and quick: 2 batches of 1 epoch, a narrow UNet, 3-step DDIM grids of 4 images.
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "model.base_channels=8",
    "module.num_samples=4",
    "sampler.num_steps=3",
]


def clean_env(tmp_path: Path) -> dict:
    """The environment of a fresh user: no W&B login, no W&B mode preset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc with W&B credentials
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_train(*overrides: str, tmp_path: Path, timeout: int = 600, module: str = "diffusion.train"):
    """Run ``python -m diffusion.train <overrides>`` from the repository root, as a user would."""
    cmd = [sys.executable, "-m", module, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: equal snapshots mean nothing was added, removed or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def csv_losses(run_dir: Path) -> dict[int, float]:
    import csv

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}


def assert_same_training(a: Path, b: Path, from_step: int) -> None:
    """The runs in ``a`` and ``b`` end with the same EMA and raw weights, Adam moments and step, and log the same
    training loss at every step from ``from_step`` on."""
    import torch

    ca = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cb = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ca["global_step"] == cb["global_step"] == 6 and ca["epoch"] == cb["epoch"]
    for key in ["state_dict", "current_model_state"]:  # EMA weights, raw weights
        for name, value in ca[key].items():
            torch.testing.assert_close(cb[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    losses_a, losses_b = csv_losses(a), csv_losses(b)
    steps = [s for s in losses_a if s >= from_step]
    assert steps and all(losses_b[s] == pytest.approx(losses_a[s], rel=1e-5) for s in steps), (losses_a, losses_b)


@pytest.fixture
def train_cli(tmp_path):
    def call(*overrides, timeout=600):
        return run_train(*overrides, tmp_path=tmp_path, timeout=timeout)

    return call


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One short run with the default logger (W&B, offline here) and a sample grid every epoch: (run dir, process)."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    proc = run_train(
        *FAST, "trainer.max_epochs=2", "module.sample_every_n_epochs=1", f"hydra.run.dir={out}", tmp_path=tmp
    )
    assert proc.returncode == 0, proc.output[-3000:]
    return out, proc


#: the runs that a resumed run is compared with: 2 epochs of 3 batches, losses in csv/metrics.csv, no grids
RESUME_RUN = [*FAST, "trainer.limit_train_batches=3", "logger=csv", "module.sample_every_n_epochs=0", "final_samples=false"]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """The run directory of ``RESUME_RUN`` with ``trainer.max_epochs=2``, uninterrupted: the reference of the resume
    tests (ckpt_path= at an epoch's end, a requeued SLURM job mid-epoch)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = run_train(*RESUME_RUN, "trainer.max_epochs=2", f"hydra.run.dir={tmp / 'out'}", tmp_path=tmp)
    assert proc.returncode == 0, proc.output[-3000:]
    return tmp / "out"


@pytest.fixture(scope="session")
def ckpt(finished_run):
    """The last checkpoint of the shared short run."""
    return finished_run[0] / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def classifier_cache(ckpt, tmp_path_factory):
    """A cache directory (``paths.cache_dir``) holding the fd_classifier classifier of the shared run's data, trained
    once for the session (~15 s on a CPU): the metric and compare tests read it instead of training their own."""
    from diffusion.metrics.classifier import trained_classifier
    from diffusion.sharing.checkpoints import read_checkpoint

    cache = tmp_path_factory.mktemp("classifier_cache")
    trained_classifier(read_checkpoint(ckpt)["hyper_parameters"]["data"], cache)
    return cache


def make_conditional_checkpoint(path: Path, num_classes: int = 10, seed: int = 0) -> Path:
    """An untrained class-conditional digits checkpoint (16 px, a narrow UNet, DDIM-3), written as diffusion.train
    writes one (hyper-parameters + state_dict + EMA's current_model_state): for tests of what reads checkpoints, where
    the pixels do not matter."""
    import torch

    from diffusion.training.module import DiffusionModule

    torch.manual_seed(seed)
    module = DiffusionModule(
        model={"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 16, "base_channels": 8,
               "channel_mult": [1, 2, 4], "num_res_blocks": 1, "attention_resolutions": [4], "num_classes": num_classes},
        schedule={"_target_": "diffusion.processes.schedules.LinearSchedule", "T": 1000},
        sampler={"_target_": "diffusion.samplers.ddim.DDIMSampler", "_partial_": True, "num_steps": 3, "eta": 0.0,
                 "spacing": "leading", "clip_denoised": True, "guidance_scale": 1.0, "guidance_rescale": 0.0},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        process={"_target_": "diffusion.processes.GaussianDiffusion", "_partial_": True},
        data={"_target_": "diffusion.data.DigitsDataModule", "image_size": 16, "batch_size": 64, "val_fraction": 0.1,
              "num_workers": 0, "hflip": False, "seed": 42},
        class_names=[str(k) for k in range(num_classes)], num_samples=20, seed=42)
    state = module.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": state, "current_model_state": state,
                "global_step": 0, "epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def cond_ckpt(tmp_path_factory):
    """An untrained class-conditional digits checkpoint (:func:`make_conditional_checkpoint`)."""
    return make_conditional_checkpoint(tmp_path_factory.mktemp("cond") / "cond.ckpt")
