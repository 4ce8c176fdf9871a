"""Every config option composes with Hydra's compose API and builds the objects it names."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion.processes.blur import BlurSchedule
from diffusion.processes.schedules import NoiseSchedule
from diffusion.train import CONFIG_DIR, build_module

GROUPS = ["schedule", "sampler", "model", "data", "optimizer", "logger", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def test_default_config_composes():
    cfg = compose_cfg()
    assert cfg.schedule._target_.endswith("LinearSchedule") and cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.logger.wandb._target_.endswith("WandbLogger")


@pytest.mark.parametrize("schedule", options("schedule"))
def test_every_schedule_builds(schedule):
    if schedule == "none":  # the continuous-time processes' (process=edm, flow): nothing to build but the marker
        assert repr(instantiate(compose_cfg("schedule=none").schedule)) == "NoSchedule()"
        return
    cfg = compose_cfg(f"schedule={schedule}", "schedule.T=50")
    sched = instantiate(cfg.schedule)
    if schedule == "blur":  # cold diffusion's kernel widths (process=blur)
        assert isinstance(sched, BlurSchedule) and sched.sigmas().shape == (51,)
    else:
        assert isinstance(sched, NoiseSchedule) and sched.table().T == 50


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("sampler", options("sampler"))
def test_every_model_and_sampler_builds_a_module_that_samples(model, sampler):
    from diffusion.samplers.registry import sampler_class

    # the cold sampler reverses the blur process only, the flow samplers the flow process only
    process = ["process=blur", "schedule.T=20"] if sampler == "cold" else ["process=flow"] if sampler.startswith("flow") \
        else ["schedule.T=20"]
    cfg = compose_cfg(f"model={model}", *process, f"sampler={sampler}", "model.base_channels=8", "sampler.num_steps=5")
    module = build_module(cfg, channels=1, image_size=16)
    assert type(module.sampler) is sampler_class(sampler) and module.sampler.num_steps == 5
    if sampler == "cold":
        module.process.observe(torch.zeros(2, 1, 16, 16))  # its prior comes from training images
    out = module.sample(2, generator=torch.Generator().manual_seed(0)).samples
    assert out.shape == (2, 1, 16, 16)


def test_model_follows_the_data_channels_and_size():
    cfg = compose_cfg("model.base_channels=8", "model.attention_resolutions=[8]")  # resolutions in pixels
    module = build_module(cfg, channels=3, image_size=32)
    assert module.model.in_channels == 3 and module.model.image_size == 32
    assert module(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("group", ["logger", "optimizer", "trainer"])
def test_every_other_option_composes(group):
    for option in options(group):
        cfg = compose_cfg(f"{group}={option}")
        assert group in cfg


def test_process_presets_pick_their_schedule_sampler_and_target():
    assert options("process") == ["blur", "edm", "flow", "gaussian"]
    gaussian, blur = compose_cfg("process=gaussian"), compose_cfg("process=blur")
    assert gaussian.schedule._target_.endswith("LinearSchedule") and gaussian.sampler._target_.endswith("DDIMSampler")
    assert blur.schedule._target_.endswith("BlurSchedule") and blur.sampler._target_.endswith("ColdSampler")
    assert blur.process._target_.endswith("BlurDiffusion") and blur.process.loss_type == "l1"
    assert gaussian.process._target_.endswith("GaussianDiffusion") and gaussian.process.objective == "eps"
    assert compose_cfg("process=blur", "schedule.T=20").schedule.T == 20  # its choices stay overridable
    for kind, process, sampler in (("edm", "EDMProcess", "HeunSampler"), ("flow", "FlowMatching", "FlowEulerSampler")):
        cfg = compose_cfg(f"process={kind}")
        assert cfg.schedule._target_.endswith("NoSchedule") and cfg.sampler._target_.endswith(sampler)
        assert cfg.process._target_.endswith(process)
    assert compose_cfg("process=edm", "sampler=dpmpp_2m").sampler._target_.endswith("DPMSolverPP2MSampler")


def test_debug_preset_composes():
    cfg = compose_cfg("debug=fast")
    assert cfg.trainer.limit_train_batches == 2 and cfg.logger is None
