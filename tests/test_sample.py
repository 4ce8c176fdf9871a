"""The sample CLI and checkpoint loading without the training config."""

import numpy as np
import pytest
import torch

from diffusion.training.module import DiffusionModule
from tests.conftest import run_train, snapshot


def sample_cli(tmp_path, *overrides):
    return run_train(*overrides, tmp_path=tmp_path, module="diffusion.sample")


def test_sample_cli_writes_grid_and_npz_reproducibly(ckpt, tmp_path):
    common = [f"ckpt={ckpt}", "n=6", "batch_size=4", "sampler.num_steps=4"]
    a = sample_cli(tmp_path, *common, "seed=3", f"hydra.run.dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.output[-3000:]
    b = sample_cli(tmp_path, *common, "seed=3", f"hydra.run.dir={tmp_path / 'b'}")
    c = sample_cli(tmp_path, *common, "seed=4", f"hydra.run.dir={tmp_path / 'c'}")
    assert b.returncode == 0 and c.returncode == 0
    sa, sb, sc = (np.load(tmp_path / d / "samples.npz")["samples"] for d in "abc")
    assert sa.shape == (6, 16, 16, 1) and sa.dtype == np.uint8
    assert np.array_equal(sa, sb), "the same seed must give the same images"
    assert not np.array_equal(sa, sc)
    # grid.png: the 6 samples, 2 a row (sqrt 6), each pixel a 4 x 4 block (16 px -> 64 px), 2 px white padding (8)
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (4 * (3 * 18 + 2), 4 * (2 * 18 + 2))
    for k in range(6):
        top, left = 4 * (2 + (k // 2) * 18), 4 * (2 + (k % 2) * 18)
        assert np.array_equal(grid[top : top + 64, left : left + 64], np.kron(sa[k, :, :, 0], np.ones((4, 4), np.uint8)))
    assert (grid[:8] == 255).all() and (grid[:, :8] == 255).all()
    assert "EMA weights" in a.output


def test_raw_weights_and_ddpm_sampler(ckpt, tmp_path):
    ema = sample_cli(tmp_path, f"ckpt={ckpt}", "n=2", "sampler.num_steps=4", f"hydra.run.dir={tmp_path / 'ema'}")
    raw = sample_cli(tmp_path, f"ckpt={ckpt}", "n=2", "sampler.num_steps=4", "ema=false", f"hydra.run.dir={tmp_path / 'raw'}")
    ddpm = sample_cli(tmp_path, f"ckpt={ckpt}", "n=2", "sampler=ddpm", "sampler.num_steps=20",  # small: the README's runs all T
                      f"hydra.run.dir={tmp_path / 'ddpm'}")
    for proc in (ema, raw, ddpm):
        assert proc.returncode == 0, proc.output[-3000:]
    assert "raw weights" in raw.output and "ddpm, 20 steps" in ddpm.output
    assert not np.array_equal(np.load(tmp_path / "ema" / "samples.npz")["samples"], np.load(tmp_path / "raw" / "samples.npz")["samples"])


@pytest.mark.parametrize(
    "overrides, text",
    [
        (["sampler.num_steps=5000"], "num_steps=5000"),
        (["sampler.num_steps=0"], "num_steps=0"),
        (["ckpt=/no/such.ckpt"], "/no/such.ckpt"),
        (["n=0"], "n=0"),
    ],
)
def test_sample_bad_input(ckpt, tmp_path, overrides, text):
    """In-process (the CLI's exit 2 and one stderr line: the first case, and tests/run/test_errors.py); every bad value is a
    one-line UsageError raised before anything is written."""
    from hydra import compose, initialize_config_dir

    from diffusion.run.config import CONFIG_DIR
    from diffusion.run.errors import UsageError
    from diffusion.sample import sample

    if overrides == ["sampler.num_steps=5000"]:
        proc = sample_cli(tmp_path, f"ckpt={ckpt}", *overrides, f"hydra.run.dir={tmp_path / 'o'}")
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.output
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="sample", overrides=[f"ckpt={ckpt}", *overrides])
        cfg.paths.output_dir = str(tmp_path / "o")
        with pytest.raises(UsageError) as err:
            sample(cfg)
        assert text in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_sample_never_overwrites(ckpt, tmp_path):
    """A refused run leaves the directory as it was, its .hydra/ config included."""
    out = tmp_path / "o"
    (out / ".hydra").mkdir(parents=True)
    np.savez(out / "samples.npz", samples=np.zeros(3))
    (out / ".hydra" / "config.yaml").write_text("n: 3\n")
    before = snapshot(out)
    proc = sample_cli(tmp_path, f"ckpt={ckpt}", "n=2", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "already holds samples.npz" in proc.stderr
    assert snapshot(out) == before


def test_from_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        DiffusionModule.from_checkpoint(text)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other)
    with pytest.raises(ValueError, match="not a checkpoint of this framework"):
        DiffusionModule.from_checkpoint(other)


def test_from_checkpoint_ema_and_raw_differ(ckpt):
    ema, raw = DiffusionModule.from_checkpoint(ckpt), DiffusionModule.from_checkpoint(ckpt, ema=False)
    assert ema.has_ema and not ema.training
    diffs = [not torch.equal(a, b) for a, b in zip(ema.model.parameters(), raw.model.parameters())]
    assert any(diffs)


def _readme_sampler(process, name):
    """The samplers of the README's sampler commands, built from their classes (not through the CLI's config)."""
    if name == "own":
        from diffusion.samplers.ddim import DDIMSampler  # the shared checkpoint trained with DDIM

        return DDIMSampler(process, num_steps=20, clip_denoised=True), 20
    if name == "dpmsolver++":
        from diffusion.samplers.dpmsolver import DPMSolverSampler

        return DPMSolverSampler(process, num_steps=15, clip_denoised=True), 15
    from diffusion.samplers.karras import EulerSampler, HeunSampler

    if name == "heun":
        return HeunSampler(process, num_steps=10, s_churn=40, clip_denoised=True), 19
    return EulerSampler(process, num_steps=20, sigmas="exponential", clip_denoised=True), 20


@pytest.mark.parametrize("name, overrides", [
    ("own", ["sampler.num_steps=20"]),
    ("dpmsolver++", ["sampler=dpmsolver++", "sampler.num_steps=15"]),
    ("heun", ["sampler=heun", "sampler.num_steps=10", "sampler.s_churn=40"]),
    ("euler", ["sampler=euler", "sampler.sigmas=exponential"]),
])
def test_readme_sampler_commands_draw_what_their_sampler_draws(ckpt, tmp_path, name, overrides):
    """The README's ``diffusion.sample ... sampler=...`` lines (run here in-process): the images written are the ones
    that sampler class draws from the same seed, and the network is called as often as the README says."""
    from hydra import compose, initialize_config_dir

    from diffusion.plots.grids import to_uint8
    from diffusion.run.config import CONFIG_DIR
    from diffusion.run.sampling import draw
    from diffusion.sample import sample

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"ckpt={ckpt}", "n=3", *overrides])
    cfg.paths.output_dir = str(tmp_path / "o")
    written = np.load(sample(cfg) / "samples.npz")["samples"]
    module = DiffusionModule.from_checkpoint(ckpt)
    sampler, nfe = _readme_sampler(module.process, name)
    assert sampler.nfe == nfe
    expected = to_uint8(draw(module, sampler, 3, cfg.batch_size, cfg.seed)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(written, expected) and written.std() > 0


def test_grid_png_carries_its_settings_and_they_draw_it_again(ckpt, tmp_path):
    """grid.png's text chunks (PIL.Image.open(p).text) name the checkpoint, sampler, steps, eta, seed, count and batch
    size; passing them to diffusion.sample again draws the same pixels."""
    import numpy as np
    from PIL import Image

    from diffusion.sample import sample
    from tests.run.test_errors import compose_cfg

    sample(compose_cfg(f"ckpt={ckpt}", "n=3", "seed=7", "batch_size=2", "sampler.num_steps=2",
                       f"paths.output_dir={tmp_path / 'a'}", config_name="sample"))
    with Image.open(tmp_path / "a" / "grid.png") as image:
        text, pixels = dict(image.text), np.asarray(image)
    assert text["ckpt"] == str(ckpt) and text["sampler"] == "ddim" and text["sampler.num_steps"] == "2"
    assert (text["seed"], text["n"], text["batch_size"], text["weights"]) == ("7", "3", "2", "EMA")
    assert float(text["sampler.eta"]) == 0.0 and text["description"].startswith("ddim, 2 steps")
    again = [f"{k}={text[k]}" for k in ("ckpt", "sampler.num_steps", "seed", "n", "batch_size")]  # its own sampler
    sample(compose_cfg(*again, f"paths.output_dir={tmp_path / 'b'}", config_name="sample"))
    with Image.open(tmp_path / "b" / "grid.png") as image:
        assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("checkpoint, overrides, command", [
    # the checkpoint's own sampler (ddim, eta 0): its eta is not in sample.yaml's sampler, so it is added with +
    ("ckpt", ["n=3", "seed=7", "batch_size=2", "sampler.num_steps=2"],
     ["sampler.num_steps=2", "+sampler.eta=0.0", "seed=7", "n=3", "batch_size=2"]),
    # sampler=<name>: its steps and eta, and the settings changed from its yaml; the raw weights, the grid's columns
    ("ckpt", ["sampler=ddim", "sampler.num_steps=3", "sampler.eta=0.5", "sampler.spacing=trailing", "n=2", "seed=1",
              "batch_size=1", "ema=false", "nrow=1"],
     ["sampler=ddim", "sampler.num_steps=3", "sampler.eta=0.5", "sampler.spacing=trailing", "seed=1", "n=2",
      "batch_size=1", "ema=false", "nrow=1"]),
    # a class-conditional checkpoint: its guidance, and the classes in their rows' order
    ("cond_ckpt", ["classes=[7,3]", "n=1", "sampler.num_steps=2", "sampler.guidance_scale=2", "batch_size=2"],
     ["sampler.num_steps=2", "+sampler.eta=0.0", "sampler.guidance_scale=2.0", "sampler.guidance_rescale=0.0",
      "seed=0", "n=1", "batch_size=2", "classes=[7,3]"]),
])
def test_grid_png_command_draws_the_same_pixels_again(checkpoint, overrides, command, request, tmp_path):
    """grid.png's ``command`` text is the exact ``python -m diffusion.sample`` line of its settings, and running it
    writes the same grid.png and samples.npz."""
    import shlex

    import numpy as np
    from PIL import Image

    from diffusion.sample import sample
    from tests.run.test_errors import compose_cfg

    path = request.getfixturevalue(checkpoint)
    sample(compose_cfg(f"ckpt={path}", *overrides, f"paths.output_dir={tmp_path / 'a'}", config_name="sample"))
    with Image.open(tmp_path / "a" / "grid.png") as image:
        text, pixels = dict(image.text), np.asarray(image)
    assert text["command"] == shlex.join(["python", "-m", "diffusion.sample", f"ckpt={path}", *command])
    args = shlex.split(text["command"])[3:]
    sample(compose_cfg(*args, f"paths.output_dir={tmp_path / 'b'}", config_name="sample"))
    with Image.open(tmp_path / "b" / "grid.png") as image:
        assert np.array_equal(np.asarray(image), pixels) and image.text["command"] == text["command"]
    first, second = (np.load(tmp_path / d / "samples.npz") for d in "ab")
    assert np.array_equal(first["samples"], second["samples"]) and first["samples"].std() > 0
    if "labels" in first:
        assert first["labels"].tolist() == second["labels"].tolist() == [7, 3]

def test_the_own_sampler_settings_of_sample_yaml_are_those_the_command_sets_without_plus():
    """grid.png's command sets the checkpoint's own sampler's settings that conf/sample.yaml holds plainly, any other
    with ``+`` (Hydra refuses a plain override of a key the config does not have)."""
    from pathlib import Path

    import yaml

    from diffusion.run.config import CONFIG_DIR
    from diffusion.sharing.reproduce import OWN_SAMPLER_KEYS

    config = yaml.safe_load((Path(CONFIG_DIR) / "sample.yaml").read_text())
    assert tuple(config["sampler"]) == OWN_SAMPLER_KEYS
