"""Checkpoints written before the processes/ and samplers/ packages (main at cbc3524, tests/data/legacy) still load
and draw exactly the samples that code drew from them."""

from pathlib import Path

import pytest
import torch

from diffusion.training.module import DiffusionModule

DATA = Path(__file__).parents[1] / "data" / "legacy"
CASES = [("gauss", "configured"), ("gauss", "ddim"),  # gauss-ddpm (1000 calls, 23 s) adds nothing to learned-ddpm
         ("blur", "configured"), ("blur", "cold"),
         ("learned", "configured"), ("learned", "ddpm"), ("learned", "ddim")]


@pytest.fixture(scope="module")
def expected():
    return torch.load(DATA / "expected_samples.pt")


@pytest.mark.parametrize("name,sampler", CASES)
def test_old_checkpoint_samples_as_before(expected, name, sampler):
    module = DiffusionModule.from_checkpoint(DATA / f"{name}.ckpt")
    chosen = module.named_sampler(sampler, num_steps=None if sampler in ("configured", "ddpm") else 4)
    out = module.sample(3, sampler=chosen, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, expected[f"{name}/{sampler}"], rtol=0, atol=1e-5)  # thread-count rounding


def test_old_hyper_parameters_map_to_the_process_config():
    module = DiffusionModule.from_checkpoint(DATA / "gauss.ckpt")
    assert module.hparams.process["objective"] == "v" and module.process.objective == "v"
    assert module.hparams.sampler["_target_"] == "diffusion.samplers.ddim.DDIMSampler"
    learned = DiffusionModule.from_checkpoint(DATA / "learned.ckpt")
    assert learned.process.variance == "learned_range" and learned.hparams.process["loss_type"] == "hybrid"
    blur = DiffusionModule.from_checkpoint(DATA / "blur.ckpt")
    assert blur.process.kind == "blur" and blur.hparams.schedule["_target_"] == "diffusion.processes.BlurSchedule"


@pytest.mark.parametrize("name", ["gauss", "blur"])
def test_lightning_load_from_checkpoint_reads_old_checkpoints_as_trained(expected, name):
    """Lightning's own loader passes the saved hyper-parameters to __init__ as they were: the old layout is upgraded
    there too (a v-objective network must not be read as an eps one, a blur schedule must not be looked up at its
    old path)."""
    module = DiffusionModule.load_from_checkpoint(DATA / f"{name}.ckpt", map_location="cpu").eval()
    assert module.process.objective == {"gauss": "v", "blur": "x0"}[name]
    out = module.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, expected[f"{name}/configured"], rtol=0, atol=1e-5)


def test_an_old_run_resumes(tmp_path):
    """A whole last.ckpt of the old layout (process options among the module's, since-retired schedule buffers,
    the EMA callback's state) resumes: one more epoch, the v objective kept; resuming it as eps is refused."""
    from tests.conftest import run_train

    small = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "model.base_channels=4",
             "model.channel_mult=[1,2]", "model.num_res_blocks=1", "module.num_samples=4", "logger=none",
             "final_samples=false", "module.sample_every_n_epochs=0", "sampler.num_steps=3", "schedule=cosine",
             f"ckpt_path={DATA / 'gauss_full.ckpt'}", "trainer.max_epochs=2"]
    from diffusion.run import preflight
    from diffusion.run.errors import UsageError
    from diffusion.train import build_module
    from tests.run.test_errors import compose_cfg

    eps = compose_cfg(*small, f"paths.output_dir={tmp_path / 'eps'}")  # as the CLI composes it, without objective=v
    with pytest.raises(UsageError, match="process.objective='v' there, 'eps' here"):
        preflight.check_resume_fits(eps, preflight.check_settings(eps), build_module(eps, channels=1, image_size=16))
    proc = run_train(*small, "process.objective=v", f"hydra.run.dir={tmp_path / 'v'}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-2000:]
    resumed = torch.load(tmp_path / "v" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 4) and resumed["hyper_parameters"]["process"]["objective"] == "v"

