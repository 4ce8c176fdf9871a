"""The networks: shapes, gradient flow, time conditioning, and construction-time errors."""

import pytest
import torch

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
    ],
)
def test_unet_bad_configuration_raises_at_construction(kwargs, text):
    with pytest.raises(ValueError) as err:
        UNet(**{"image_size": 32, **kwargs})
    assert text in str(err.value)


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
