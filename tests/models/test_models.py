"""The networks: shapes, gradient flow, time conditioning, and construction-time errors."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.models import SimpleUNet, UNet


@pytest.mark.parametrize(
    "channels, size, mult, attn",
    [(1, 16, (1, 2), (8,)), (3, 28, (1, 2, 2), (7,)), (1, 32, (1, 2, 2), (16,)), (3, 64, (1, 1, 2, 2), (16, 8))],
)
def test_unet_output_shape_equals_input(channels, size, mult, attn):
    model = UNet(in_channels=channels, image_size=size, base_channels=8, channel_mult=mult, num_res_blocks=1, attention_resolutions=attn)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


@pytest.mark.parametrize("factory", [
    lambda: UNet(in_channels=3, image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.1),
    lambda: SimpleUNet(in_channels=3, image_size=16, base_channels=4, channel_mult=(1, 2, 4)),
], ids=["unet", "simple_unet"])
def test_gradients_reach_every_parameter_and_time_matters(factory):
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(4, 3, 16, 16)
    model(x, torch.tensor([1, 10, 100, 900])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.eval()
    with torch.no_grad():
        a = model(x, torch.full((4,), 5))
        b = model(x, torch.full((4,), 500))
    assert (a - b).abs().mean() > 1e-3, "the output must depend on the timestep"


def test_simple_unet_shapes():
    model = SimpleUNet(in_channels=1, image_size=28, base_channels=4, channel_mult=(1, 2, 4))
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([3, 4])).shape == x.shape


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = UNet(in_channels=1, image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
    b = UNet(in_channels=1, image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 400])
    a(x, t).sum().backward()
    b(x, t).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(image_size=28, channel_mult=(1, 2, 2, 2)), "image_size=28 cannot be halved 3 times"),
        (dict(base_channels=-1), "base_channels=-1"),
        (dict(base_channels=0), "base_channels=0"),
        (dict(attention_resolutions=(12,)), "attention_resolutions=[12]"),
        (dict(channel_mult=()), "channel_mult=[]"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(num_res_blocks=0), "num_res_blocks=0"),
        (dict(norm_groups=3), "model norm_groups=3 is invalid: it must divide the channel count of every GroupNorm"),
        (dict(norm_groups=0), "norm_groups=0 is invalid: it must be a positive integer, auto"),
        (dict(norm_groups="many"), "norm_groups='many' is invalid: it must be a positive integer, auto"),
    ],
)
def test_unet_bad_configuration_raises_at_construction(kwargs, text):
    with pytest.raises(ValueError) as err:
        UNet(**{"image_size": 32, **kwargs})
    assert text in str(err.value)


def test_norm_groups_sets_every_group_norm_and_null_keeps_the_per_layer_rule():
    """null: gcd(32, channels // 4) groups per layer (4 at 16 channels ... 32 at 128); an integer: that count in every
    GroupNorm, residual, attention and output head alike, and the same parameters."""
    def counts(net):
        return sorted({(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)})

    args = dict(in_channels=1, image_size=16, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(4,))
    per_layer, one = UNet(**args), UNet(**args, norm_groups=8)
    assert counts(per_layer) == [(16, 4), (32, 8), (48, 4), (64, 16), (96, 8), (128, 32)]
    assert {g for _, g in counts(one)} == {8} and [c for c, _ in counts(one)] == [16, 32, 48, 64, 96, 128]
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in per_layer.parameters())
    with pytest.raises(ValueError, match=r"norm_groups=6 is invalid: .* \(16, 32, 48, 64, 96, 128 here\), e.g. 4;"):
        UNet(**args, norm_groups=6)
    # auto: the largest count dividing every width with >= 4 channels a group: 4 here, DDPM's 32 at multiples of 128
    assert {g for _, g in counts(UNet(**args, norm_groups="auto"))} == {4}
    wide = dict(args, base_channels=128, channel_mult=(1, 2), image_size=8)
    assert counts(UNet(**wide, norm_groups="auto")) == counts(UNet(**wide)) and {g for _, g in counts(UNet(**wide))} == {32}


def test_simple_unet_bad_size_raises():
    with pytest.raises(ValueError, match="image_size=20 cannot be halved 4 times"):
        SimpleUNet(image_size=20, channel_mult=(1, 2, 4, 8, 16))
    with pytest.raises(ValueError, match="activation='gelu'"):
        SimpleUNet(activation="gelu")


@pytest.mark.parametrize("block_attention, skip_gates", [("cbam", False), ("none", True), ("cbam", True), ("self", True)])
def test_cbam_and_skip_gates_keep_shapes_and_train(block_attention, skip_gates):
    from diffusion.models.blocks import CBAM, AttentionGate

    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=16, base_channels=8, channel_mult=[1, 2], attention_resolutions=[16, 8],
               block_attention=block_attention, skip_gates=skip_gates)
    kinds = {type(m) for m in net.modules()}
    assert (CBAM in kinds) == (block_attention == "cbam") and (AttentionGate in kinds) == skip_gates
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 100, 999])
    out = net(x, t)
    assert out.shape == x.shape
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = out.pow(2).mean()
    loss.backward()
    extra = [p for m in net.modules() if isinstance(m, (CBAM, AttentionGate)) for p in m.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra), "every CBAM/gate parameter must learn"
    optimizer.step()
    assert net(x, t).pow(2).mean() < loss


def test_bad_block_attention_is_one_line():
    with pytest.raises(ValueError, match="block_attention='transformer' is invalid: allowed values are none, self, cbam"):
        UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], attention_resolutions=[], block_attention="transformer")


# ----------------------------------------------------------------------------------------------- the configured UNet
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from diffusion.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _module(cfg):
    from diffusion.run.errors import build_or_usage_error
    from diffusion.train import build_module

    return build_or_usage_error("model", lambda: build_module(cfg, cfg.data.get("channels", 1), cfg.data.image_size))


def _layout(model) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


#: the digits default network as the config built it before attention followed the data (conf/model/unet.yaml had
#: attention_resolutions: [4]); these are the hyper-parameters its checkpoints hold
OLD_DIGITS_HPARAMS = {"_target_": "diffusion.models.UNet", "base_channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 2,
                      "attention_resolutions": [4], "dropout": 0.0, "time_emb_dim": None, "num_heads": 1,
                      "gradient_checkpointing": False, "learn_sigma": False, "block_attention": "self", "skip_gates": False,
                      "channels_last": False, "compile": False, "in_channels": 1, "image_size": 16}


def test_the_digits_default_network_is_unchanged_and_loads_old_checkpoints():
    import hashlib

    from diffusion.training.module import DiffusionModule

    torch.manual_seed(0)
    assert _compose().model.num_res_blocks == 1  # the digits default since the first-run study (experiments/first_run.py)
    module = _module(_compose("model.num_res_blocks=2"))  # the network of the checkpoints written before it
    assert module.hparams.model["num_classes"] is None  # unconditional (data.conditional=false): no class embedding
    assert module.hparams.model["norm_groups"] is None  # the per-layer group counts the old checkpoints were trained with
    assert {k: v for k, v in module.hparams.model.items() if k not in ("num_classes", "norm_groups")} == OLD_DIGITS_HPARAMS
    layout = _layout(module.model)
    assert sum(p.numel() for p in module.model.parameters()) == 989_217 and len(layout) == 246  # the README's 0.99 M
    digest = hashlib.sha256("".join(f"{k}:{s};" for k, s in layout).encode()).hexdigest()
    assert digest == "92a839dfb6be5e3579bf8ba758e3b512f1f7015eeae66de650b1815ad85bcb78"  # keys and shapes before the change
    torch.manual_seed(0)
    old = DiffusionModule(model=OLD_DIGITS_HPARAMS, **{k: v for k, v in module.hparams.items() if k != "model"})
    for (k, a), b in zip(module.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), k  # the same initialisation from the same seed: the same network
    old.load_state_dict(module.state_dict(), strict=True)  # an old checkpoint's weights fit the new default, and back
    module.load_state_dict(old.state_dict(), strict=True)


DATA_SIZES = {"digits": (1, 16), "folder": (3, 64), "ffhq": (3, 64), "dog": (3, 32), "simpsons": (3, 64), "cars": (3, 128),
              "flowers": (3, 64), "mnist": (1, 28), "fashion_mnist": (1, 28)}


@pytest.mark.parametrize("data", sorted(DATA_SIZES))
def test_the_default_model_fits_every_data_option_at_its_own_size(data):
    """Attention at the deepest of the three default levels, image_size / 4 px, whatever the data's size."""
    from diffusion.models.blocks import AttentionBlock

    cfg = _compose(f"data={data}", *([] if data == "digits" else ["data.root=/somewhere"]), "model.base_channels=8")
    channels, size = DATA_SIZES[data]
    assert (cfg.data.get("channels", 1), cfg.data.image_size) == (channels, size)
    net = _module(cfg).model
    assert OmegaConf.to_container(cfg.model, resolve=True)["attention_resolutions"] == [size // 4]
    # where the attention blocks sit: the input of every block they follow has the deepest level's side
    sides = []
    hooks = [m.register_forward_hook(lambda m, i, o: sides.append(i[0].shape[-1])) for m in net.modules() if isinstance(m, AttentionBlock)]
    assert net(torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long)).shape == (1, channels, size, size)
    for h in hooks:
        h.remove()
    blocks = cfg.model.num_res_blocks  # 1 for the digits default
    assert len(sides) == blocks + (blocks + 1) + 1 and set(sides) == {size // 4}  # down blocks, up blocks, the middle


@pytest.mark.parametrize("overrides, text", [
    (["model.attention_resolutions=[5]"], "model attention_resolutions=[5] is invalid: [5] not among the network's resolutions [16, 8, 4]"),
    (["data=folder", "data.root=/x", "model.attention_resolutions=[4]"],
     "model attention_resolutions=[4] is invalid: [4] not among the network's resolutions [64, 32, 16]"),
])
def test_an_explicit_bad_attention_resolution_is_a_one_line_error(overrides, text):
    from diffusion.run.errors import UsageError

    with pytest.raises(UsageError) as err:
        _module(_compose(*overrides, "model.base_channels=8"))
    assert str(err.value) == text


def _preset_model(name: str) -> dict:
    """The model keys a conf/experiment preset sets, read from its YAML (and the presets it builds on)."""
    import yaml

    from diffusion.train import CONFIG_DIR

    preset = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text())
    model = {}
    for base in preset.get("defaults", []):
        if isinstance(base, str) and base != "_self_":
            model.update(_preset_model(base))
    return {**model, **(preset.get("model") or {})}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "experiment").glob("*.yaml")))
def test_presets_compose_and_keep_their_architectures(preset):
    cfg = _compose(f"experiment={preset}", "data.root=/somewhere")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    expected = _preset_model(preset)
    assert "attention_resolutions" in expected and {k: model[k] for k in expected} == expected
    small = _compose(f"experiment={preset}", "data.root=/somewhere", "model.base_channels=8", "model.time_emb_dim=null")
    assert _module(small).model.image_size == cfg.data.image_size  # it builds at its data's size
