"""Share a model (issue #17): python -m diffusion.export writes the weights as safetensors plus the settings as JSON;
ckpt= of every CLI and train's init_from read the folder back, and it samples exactly as the checkpoint did."""

import json

import pytest
import torch

from diffusion.run.errors import UsageError
from diffusion.training.module import DiffusionModule
from tests.run.test_errors import compose_cfg


def _export(ckpt, out, *overrides):
    from diffusion.export import export

    return export(compose_cfg(f"ckpt={ckpt}", f"out={out}", *overrides, f"paths.output_dir={out.parent / 'log'}",
                              config_name="export"))


def _samples(module, labels=None):
    n = 4 if labels is None else len(labels)
    return module.sample(n, generator=torch.Generator().manual_seed(3), labels=labels).samples


def test_safetensors_export_reproduces_the_checkpoints_samples_exactly(ckpt, cond_ckpt, tmp_path):
    from safetensors.torch import load_file

    for source, labels in ((ckpt, None), (cond_ckpt, torch.tensor([3, 7, 7]))):
        out = tmp_path / f"shared_{source.stem}"
        _export(source, out)
        original = DiffusionModule.from_checkpoint(source)
        shared = DiffusionModule.from_checkpoint(out)  # what ckpt=<folder> does in every CLI
        assert torch.equal(_samples(original, labels), _samples(shared, labels))
        tensors = load_file(out / "model.safetensors")
        assert tensors.keys() == original.state_dict().keys()
        assert all(torch.equal(tensors[k], v) for k, v in original.state_dict().items())  # the EMA weights, as is
        config = json.loads((out / "config.json").read_text())
        assert config["format"] == "diffusion-safetensors" and config["has_ema"] is True
        assert config["hyper_parameters"]["model"] == json.loads(json.dumps(dict(original.hparams.model)))
        assert shared.num_classes == original.num_classes
    raw = tmp_path / "raw"
    _export(ckpt, raw, "ema=false")
    assert torch.equal(_samples(DiffusionModule.from_checkpoint(raw, ema=True)),
                       _samples(DiffusionModule.from_checkpoint(ckpt, ema=False)))
    assert json.loads((raw / "config.json").read_text())["has_ema"] is False


def test_an_export_never_writes_over_anything_and_a_failed_one_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "shared"
    out.mkdir()
    with pytest.raises(UsageError, match="already exists: an export never writes over anything"):
        _export(ckpt, out)
    assert list(out.iterdir()) == []

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        _export(ckpt, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))  # no half-written folder
    with pytest.raises(UsageError, match="format='onnx' is invalid: allowed values are safetensors, diffusers"):
        _export(ckpt, tmp_path / "x", "format=onnx")


def test_sample_reads_an_exported_folder_and_train_fine_tunes_from_it(ckpt, tmp_path, monkeypatch):
    import numpy as np

    import diffusion.train
    from diffusion.sample import sample
    from diffusion.train import build_module, train
    from tests.conftest import FAST

    out = tmp_path / "shared"
    _export(ckpt, out)
    sample(compose_cfg(f"ckpt={out}", "n=2", "seed=1", f"paths.output_dir={tmp_path / 's'}", config_name="sample"))
    sample(compose_cfg(f"ckpt={ckpt}", "n=2", "seed=1", f"paths.output_dir={tmp_path / 'c'}", config_name="sample"))
    assert np.array_equal(np.load(tmp_path / "s" / "samples.npz")["samples"], np.load(tmp_path / "c" / "samples.npz")["samples"])

    built = []
    monkeypatch.setattr(diffusion.train, "build_module", lambda *a, **k: built.append(build_module(*a, **k)) or built[-1])
    source = DiffusionModule.from_checkpoint(out)
    start = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = compose_cfg(*FAST, "logger=none", "model.base_channels=16", f"init_from={out}",
                      f"paths.output_dir={tmp_path / 'ft'}")
    train(cfg)
    (module,) = built
    assert module.hparams.model["base_channels"] == 8  # the source's network, not this run's model.base_channels=16
    assert module.global_step == 2
    moved = [k for k, v in module.state_dict().items() if k.startswith("model.") and not torch.equal(v.cpu(), start[k])]
    assert moved  # trained on from the source's weights ...
    first = next(k for k in start if k.startswith("model.") and k.endswith("weight"))
    assert (module.state_dict()[first] - start[first]).abs().max() < 0.05  # ... a few small steps away from them

    with pytest.raises(UsageError, match=r"init_from=.* was trained on 1-channel 16 px images, and this run's data gives "
                                         r"1-channel 32 px ones"):
        train(compose_cfg(*FAST, "logger=none", "data.image_size=32", f"init_from={out}", f"paths.output_dir={tmp_path / 'x'}"))
    with pytest.raises(UsageError, match="init_from=.* is invalid with ckpt_path="):
        train(compose_cfg(*FAST, "logger=none", f"init_from={out}", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'y'}"))


def _diffusers_compatible_checkpoint(path):
    """An untrained 16 px UNet whose every GroupNorm has 32 groups (widths multiples of 128), the form UNet2DModel
    can hold, written as diffusion.train writes a checkpoint (DDIM-3, clipped)."""
    from diffusion.training.module import DiffusionModule

    torch.manual_seed(0)
    module = DiffusionModule(
        model={"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 16, "base_channels": 128,
               "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [8]},
        schedule={"_target_": "diffusion.processes.schedules.LinearSchedule", "T": 1000},
        sampler={"_target_": "diffusion.samplers.ddim.DDIMSampler", "_partial_": True, "num_steps": 3,
                 "clip_denoised": True},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        process={"_target_": "diffusion.processes.GaussianDiffusion", "_partial_": True}, seed=0)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_diffusers_export_loads_in_diffusers_and_reads_back(tmp_path):
    """format=diffusers: DDPMPipeline.from_pretrained(DIR) loads it and its UNet computes ours; ckpt=DIR reads it back
    and DDIM samples the same pixels as the checkpoint; the digits default (GroupNorm groups 4, 8, 16) is refused."""
    diffusers = pytest.importorskip("diffusers")
    ckpt = _diffusers_compatible_checkpoint(tmp_path / "wide.ckpt")
    out = tmp_path / "pipe"
    _export(ckpt, out, "format=diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    original = DiffusionModule.from_checkpoint(ckpt)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, original.model(x, t), atol=1e-5, rtol=1e-5)
    shared = DiffusionModule.from_checkpoint(out)  # ckpt=<a diffusers folder>
    sampler = shared.named_sampler("ddim", 3)
    ours = original.named_sampler("ddim", 3)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(shared.sample(2, sampler=sampler, generator=g1).samples,
                               original.sample(2, sampler=ours, generator=g2).samples, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="GroupNorm"):
        from tests.conftest import make_conditional_checkpoint

        _export(make_conditional_checkpoint(tmp_path / "digits.ckpt"), tmp_path / "no", "format=diffusers")
    assert not (tmp_path / "no").exists()
