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


# ------------------------------------------------------------------------------- the package layout of issue #27
def test_a_folder_exported_before_the_layout_change_samples_as_its_checkpoint(expected):
    """tests/data/legacy/exported: gauss.ckpt exported by main at e37b816 (``diffusion.export format=safetensors``),
    whose config.json names the schedule by its path then, ``diffusion.schedules.CosineSchedule``: it loads (the path
    upgraded) and draws the checkpoint's own samples."""
    import json

    config = json.loads((DATA / "exported" / "config.json").read_text())
    assert config["hyper_parameters"]["schedule"]["_target_"] == "diffusion.schedules.CosineSchedule"  # as written
    module = DiffusionModule.from_checkpoint(DATA / "exported")
    assert module.hparams.schedule["_target_"] == "diffusion.processes.schedules.CosineSchedule"
    out = module.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, expected["gauss/configured"], rtol=0, atol=1e-5)


def test_every_class_path_an_earlier_layout_saved_is_upgraded_to_one_that_imports():
    """Each class path a checkpoint or exported folder of an earlier layout can name (the schedules, the imported
    diffusers schedule, the samplers and the blur schedule before their packages) maps to today's path, which
    imports; today's paths stay as they are."""
    from hydra.utils import get_class

    from diffusion.sharing.legacy import upgrade_hyper_parameters, upgrade_target

    old = {f"diffusion.schedules.{n}Schedule": f"diffusion.processes.schedules.{n}Schedule"
           for n in ("Linear", "Cosine", "ContinuousCosine", "Quadratic", "Sigmoid")}
    old["diffusion.diffusers_bridge.TrainedBetasSchedule"] = "diffusion.sharing.diffusers_bridge.TrainedBetasSchedule"
    old["diffusion.samplers.DDIMSampler"] = "diffusion.samplers.ddim.DDIMSampler"
    old["diffusion.blur.BlurSchedule"] = "diffusion.processes.BlurSchedule"
    for before, now in old.items():
        assert upgrade_target(before) == now and get_class(now).__name__ == now.rsplit(".", 1)[1]
    for today in ("diffusion.models.UNet", "diffusion.processes.GaussianDiffusion", "torch.optim.AdamW",
                  "diffusion.data.DigitsDataModule", "diffusion.samplers.karras.HeunSampler"):
        assert upgrade_target(today) == today
    hparams = upgrade_hyper_parameters({"schedule": {"_target_": "diffusion.diffusers_bridge.TrainedBetasSchedule",
                                                     "betas": [0.1, 0.2]},
                                        "sampler": {"_target_": "diffusion.samplers.ddpm.DDPMSampler"},
                                        "process": {"_target_": "diffusion.processes.GaussianDiffusion"}})
    assert hparams["schedule"] == {"_target_": "diffusion.sharing.diffusers_bridge.TrainedBetasSchedule", "betas": [0.1, 0.2]}


def test_lightning_load_from_checkpoint_reads_the_layout_before_the_packages(tmp_path, expected):
    """A checkpoint of the layout just before issue #27 (process options in conf/process/, the schedule at
    ``diffusion.schedules``, a diffusers-imported schedule at ``diffusion.diffusers_bridge``), read by Lightning's own
    loader, which passes the saved hyper-parameters to __init__ as they are: built with today's classes."""
    ckpt = torch.load(DATA / "gauss.ckpt", map_location="cpu", weights_only=True)
    module = DiffusionModule.from_checkpoint(DATA / "gauss.ckpt")
    hparams = dict(module.hparams)
    betas = module.process.betas.double().tolist()
    hparams["schedule"] = {"_target_": "diffusion.diffusers_bridge.TrainedBetasSchedule", "betas": betas}
    ckpt["hyper_parameters"] = hparams
    path = tmp_path / "pre27.ckpt"
    torch.save(ckpt, path)
    loaded = DiffusionModule.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.hparams.schedule["_target_"] == "diffusion.sharing.diffusers_bridge.TrainedBetasSchedule"
    out = loaded.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, expected["gauss/configured"], rtol=0, atol=1e-5)
