"""A class-conditional digits run from the command line (``data.conditional=true``): its grids hold one named row per
class, drawn for those classes; a held-out classifier recognises the classes far above chance, more so with
guidance; the checkpoint samples any class with diffusion.sample; bad settings are refused in one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.plots.grids import grid_array
from diffusion.training.module import DiffusionModule
from tests.conftest import run_train
from tests.wandb_records import records

#: a short conditional run: long enough that the samples carry their class (measured in the accuracy test)
COND_EPOCHS = 10


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory):
    """Digits with their labels, the default network, COND_EPOCHS epochs, W&B offline, one final grid of 2 per class."""
    tmp = tmp_path_factory.mktemp("cond_run")
    out = tmp / "out"
    proc = run_train("data.conditional=true", f"trainer.max_epochs={COND_EPOCHS}", "module.sample_every_n_epochs=0",
                     "module.num_samples=20", "sampler.num_steps=20", f"hydra.run.dir={out}", tmp_path=tmp, timeout=900)
    assert proc.returncode == 0, proc.output[-3000:]
    return out, proc


def _grid_box(path):
    """The images' box (x, y, width, height) of a labelled grid PNG and its text chunks."""
    image = Image.open(path)
    x, y, w, h = map(int, image.text["Grid"].split())
    return np.asarray(image.convert("L"))[y : y + h, x : x + w], image.text


def test_final_grid_has_one_named_row_per_class_drawn_for_that_class(cond_run):
    """samples/final.png: row k holds 2 samples of class k (the EMA weights' draw for labels [0,0,1,1,...,9,9] with the
    run's seed, redrawn here from the checkpoint), the row named by its class; W&B got the same pixels."""
    out, proc = cond_run
    assert "10 classes" in proc.output  # the data's start-up line
    module = DiffusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert module.num_classes == 10 and module.class_names == [str(k) for k in range(10)]
    labels = torch.arange(10).repeat_interleave(2)
    images = module.sample(20, generator=torch.Generator().manual_seed(module.hparams.seed), labels=labels).samples
    pixels, text = _grid_box(out / "samples" / "final.png")
    assert np.array_equal(pixels, grid_array(images, nrow=2))
    assert text["Rows"] == " | ".join(str(k) for k in range(10))
    run = next((out / "wandb").glob("offline-run-*"))
    (record,) = [r for r in records(next(run.glob("run-*.wandb"))) if "samples/filenames" in r]
    assert "one row per class" in record["samples/captions"][0]
    logged = np.asarray(Image.open(run / "files" / record["samples/filenames"][0]))
    assert np.array_equal(logged, np.asarray(Image.open(out / "samples" / "final.png")))


def test_a_held_out_classifier_recognises_the_classes_and_guidance_helps(cond_run, classifier_cache):
    """The fd_classifier metric's LeNet (trained on the real training digits only) labels the samples drawn for class
    k as k: far above chance (10%) at w = 1, and more often at w = 2 than at w = 0 (the unconditional model)."""
    from diffusion.metrics.classifier import trained_classifier

    out, _ = cond_run
    module = DiffusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")
    feature, _ = trained_classifier(module.hparams.data, classifier_cache)
    labels = torch.arange(10).repeat(20)  # 200 samples, 20 of each class
    accuracy = {}
    for w in (0.0, 1.0, 2.0):
        sampler = module.named_sampler("ddim", 20, guidance_scale=w)
        images = module.sample(200, sampler=sampler, generator=torch.Generator().manual_seed(1), labels=labels).samples
        with torch.no_grad():
            predicted = feature.classifier(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)).argmax(1)
        accuracy[w] = float((predicted == labels).double().mean())
    print("class accuracy by guidance scale:", accuracy)
    assert accuracy[1.0] > 0.5, accuracy  # chance: 0.1
    assert accuracy[2.0] > accuracy[0.0] + 0.2, accuracy


def test_sample_cli_draws_the_chosen_classes_of_the_checkpoint(cond_run, tmp_path):
    """The README's two commands: ``"classes=[3,7]" n=4 sampler.guidance_scale=4 sampler.guidance_rescale=0.7`` (a
    subprocess) writes 4 images of class 3 then 4 of class 7, exactly module.sample's for those labels, guidance and
    seed, with the labels; ``classes=all n=1 sampler.guidance_scale=2`` (in-process) one of each class, a named row
    each."""
    from diffusion.sample import sample
    from tests.run.test_errors import compose_cfg

    out, _ = cond_run
    ckpt = out / "checkpoints" / "last.ckpt"
    proc = run_train(f"ckpt={ckpt}", "classes=[3,7]", "n=4", "sampler.guidance_scale=4", "sampler.guidance_rescale=0.7",
                     "seed=5", f"hydra.run.dir={tmp_path / 's'}", tmp_path=tmp_path, module="diffusion.sample")
    assert proc.returncode == 0, proc.output[-2000:]
    saved = np.load(tmp_path / "s" / "samples.npz")
    assert saved["labels"].tolist() == [3] * 4 + [7] * 4
    module = DiffusionModule.from_checkpoint(ckpt)
    sampler = module.build_sampler(dict(module.hparams.sampler), guidance_scale=4.0, guidance_rescale=0.7)
    labels = torch.tensor([3] * 4 + [7] * 4)
    images = module.sample(8, sampler=sampler, generator=torch.Generator().manual_seed(5), labels=labels).samples
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(saved["samples"], expected)
    pixels, text = _grid_box(tmp_path / "s" / "grid.png")
    assert text["Rows"] == "3 | 7" and "guidance 4 (rescale 0.7)" in text["Title"]
    assert np.array_equal(pixels, grid_array(images, nrow=4))

    sample(compose_cfg(f"ckpt={ckpt}", "classes=all", "n=1", "sampler.guidance_scale=2",
                       f"paths.output_dir={tmp_path / 'all'}", config_name="sample"))
    saved = np.load(tmp_path / "all" / "samples.npz")
    assert saved["labels"].tolist() == list(range(10)) and saved["samples"].shape == (10, 16, 16, 1)
    assert _grid_box(tmp_path / "all" / "grid.png")[1]["Rows"] == " | ".join(map(str, range(10)))


@pytest.mark.parametrize("overrides, message", [
    (["model.num_classes=10"], "model.num_classes=10 is invalid without data.conditional=true"),
    (["data.conditional=true", "model.num_classes=5"], "model.num_classes=5 is invalid: the data has 10 classes"),
    (["data.conditional=true", "module.cond_drop_prob=1.5"], "module.cond_drop_prob=1.5 is invalid"),
    (["sampler.guidance_scale=-1"], "sampler guidance_scale=-1 is invalid"),
])
def test_bad_conditional_training_settings_are_refused_in_one_line(overrides, message, tmp_path):
    from tests.run.test_errors import refused

    assert message in refused(tmp_path, *overrides)


def test_guidance_and_classes_on_an_unconditional_checkpoint_are_refused(ckpt, tmp_path):
    """diffusion.sample refuses them in one line (the UsageError the CLI prints) and writes nothing."""
    from diffusion.run.errors import UsageError
    from diffusion.sample import sample
    from tests.run.test_errors import compose_cfg

    for override, message in (("sampler.guidance_scale=2", "the model is unconditional"),
                              ("classes=[3]", "classes=[3] is invalid for ckpt=")):
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
            sample(compose_cfg(f"ckpt={ckpt}", override, f"paths.output_dir={tmp_path / 's'}", config_name="sample"))
        assert "\n" not in str(info.value)
        assert not (tmp_path / "s").exists()
