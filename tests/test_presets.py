"""conf/experiment presets: the seeds' settings, composed and run end to end on generated data."""

import pytest
from hydra import compose, initialize_config_dir

from diffusion.train import CONFIG_DIR
from tests.conftest import run_train
from tests.data.test_data import make_image_folder, make_mnist

# preset: (data kind, checks on the composed config)
PRESETS = {
    "human64": ("folder", {"data.image_size": 64, "data.limit": 10000, "data.batch_size": 16, "schedule.T": 750,
                           "schedule.beta_start": 1e-4, "schedule.beta_end": 0.02, "model.base_channels": 384,
                           "model.time_emb_dim": 512, "optimizer.lr": 1e-4}),
    "drunksimp64": ("folder", {"data.image_size": 64, "schedule.T": 500, "model.base_channels": 256}),
    "dog32": ("folder", {"data.image_size": 32, "data.limit": 500, "data.batch_size": 32, "schedule.T": 1000,
                         "model.base_channels": 256}),
    "mnist": ("mnist", {"data.dataset": "mnist", "data.image_size": 28}),
    "fashion_mnist": ("mnist", {"data.dataset": "fashion_mnist", "data.image_size": 28}),
    "cars128": ("folder", {"data.image_size": 128}),
    "flowers64": ("folder", {"data.image_size": 64, "sampler._target_": "diffusion.samplers.ddim.DDIMSampler",
                             "schedule._target_": "diffusion.processes.schedules.ContinuousCosineSchedule",
                             "callbacks.ema.decay": 0.999}),
}
LIGHT = {"mnist", "fashion_mnist", "flowers64"}


def select(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_has_the_seed_settings(preset):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", "data.root=/somewhere"])
    for key, expected in PRESETS[preset][1].items():
        assert select(cfg, key) == expected, key


def _data_overrides(kind, tmp_path):
    if kind == "folder":
        root = make_image_folder(tmp_path / "images")
        return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.include=[]", "data.limit=null"]
    make_mnist(tmp_path / "mnist", "MNIST")
    make_mnist(tmp_path / "mnist", "FashionMNIST")
    return [f"data.root={tmp_path / 'mnist'}"]


def _fast_dev_run(preset, tmp_path):
    kind = PRESETS[preset][0]
    out = tmp_path / "out"
    proc = run_train(
        f"experiment={preset}", *_data_overrides(kind, tmp_path), "trainer.fast_dev_run=true", "data.batch_size=2",
        "data.num_workers=0", "module.num_samples=1", "sampler.num_steps=2", "logger=none", f"hydra.run.dir={out}",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert (out / "samples" / "final.png").is_file()


@pytest.mark.parametrize("preset", sorted(LIGHT))
def test_light_preset_runs(preset, tmp_path):
    _fast_dev_run(preset, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(set(PRESETS) - LIGHT))
def test_large_preset_runs(preset, tmp_path):
    _fast_dev_run(preset, tmp_path)
