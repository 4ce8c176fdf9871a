"""Checkpoints written before the processes/ and samplers/ packages (main at cbc3524, tests/data/legacy) still load
and draw exactly the samples that code drew from them."""

from pathlib import Path

import pytest
import torch

from diffusion.module import DiffusionModule

DATA = Path(__file__).parent / "data" / "legacy"
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
