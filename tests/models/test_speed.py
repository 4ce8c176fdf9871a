"""Every speed switch trains on the CPU, configured only, and gives the loss the plain run gives (#6)."""

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from diffusion.train import CONFIG_DIR, build_module
from diffusion.training.ema import EMA
from diffusion.training.module import DiffusionModule

STEPS = 4


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_losses(tmp_path, *overrides: str) -> tuple[list[float], DiffusionModule]:
    """The training losses of STEPS optimizer steps of a narrow UNet on digits, with the EMA callback."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model.base_channels=8", "data.batch_size=16", *overrides])
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.channels, datamodule.image_size)
    recorder = LossRecorder()
    trainer = instantiate(cfg.trainer, callbacks=[recorder, EMA(decay=0.9)], logger=False, enable_checkpointing=False,
                          max_steps=STEPS, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule)
    assert len(recorder.losses) == STEPS
    return recorder.losses, module


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train_losses(tmp_path_factory.mktemp("plain"))[0]


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """torch.compile as configured, with AOTAutograd's eager backend: the graph capture of forward and backward is
    exercised in seconds; inductor's C++ code generation (minutes on 2 cores) runs in the slow test below."""
    original = torch.nn.Module.compile

    def compile(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **{**kwargs, "backend": "aot_eager"})

    calls: list = []
    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    return calls


@pytest.mark.parametrize(
    "overrides, rtol",
    [
        (["model.channels_last=true"], 1e-4),
        (["optimizer.fused=true"], 1e-4),
        (["model.gradient_checkpointing=true"], 1e-4),
        (["trainer.precision=bf16-mixed"], 2e-2),  # bfloat16 keeps 8 bits of mantissa
        (["trainer.precision=bf16-mixed", "model.channels_last=true", "model.gradient_checkpointing=true"], 2e-2),
    ],
)
def test_speed_option_trains_to_the_same_loss(tmp_path, plain, overrides, rtol):
    losses, _ = train_losses(tmp_path, *overrides)
    assert losses == pytest.approx(plain, rel=rtol), f"{overrides}: {losses} vs {plain}"
    assert losses[-1] != losses[0], "the weights must have been updated"


def test_channels_last_reaches_the_network(tmp_path):
    _, module = train_losses(tmp_path, "model.channels_last=true")
    conv = module.model.down[0][0].conv2
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_hook(lambda m, i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    module.model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    assert seen == [True]


def test_compile_trains_to_the_same_loss_and_keeps_the_checkpoint_format(tmp_path, plain, compile_without_codegen):
    losses, module = train_losses(tmp_path, "model.compile=true", "model.channels_last=true")
    assert compile_without_codegen == [{"mode": None}], "model.compile=true must compile the network once"
    assert losses == pytest.approx(plain, rel=1e-3)
    # the checkpoint of a compiled model loads into a plain one: same keys, same values
    plain_module = train_losses(tmp_path / "p")[1]
    assert module.state_dict().keys() == plain_module.state_dict().keys()
    plain_module.load_state_dict(module.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(plain_module.model(x, t), module.model(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_with_inductor_trains_to_the_same_loss(tmp_path, plain):
    losses, _ = train_losses(tmp_path, "model.compile=true")
    assert losses == pytest.approx(plain, rel=1e-3)


def test_bad_compile_value_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="compile='fastest' is invalid"):
        train_losses(tmp_path, "model.compile=fastest")


def test_fused_with_mixed_precision_and_clipping_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="optimizer.fused=true cannot be combined with trainer.precision=bf16-mixed"):
        train_losses(tmp_path, "trainer.precision=bf16-mixed", "optimizer.fused=true")
