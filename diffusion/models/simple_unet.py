"""The seeds' simpler UNet: conv blocks with BatchNorm, strided-conv down, transposed-conv up, time added per block.

It reproduces the small models of the seed reports (a common DDPM tutorial architecture); prefer
:class:`diffusion.models.UNet` for quality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffusion.models.blocks import ClassEmbedding, timestep_embedding
from diffusion.models.settings import ACTIVATION_NAMES, check_simple_unet

ACTIVATIONS = dict(zip(ACTIVATION_NAMES, (nn.ReLU, nn.LeakyReLU)))


class SimpleBlock(nn.Module):
    """conv -> act -> BN, + time embedding, conv -> act -> BN, then a strided conv (down) or transposed conv (up)."""

    def __init__(self, in_ch: int, out_ch: int, time_emb_dim: int, up: bool, activation: type[nn.Module]):
        super().__init__()
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        self.conv1 = nn.Conv2d(2 * in_ch if up else in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bnorm1 = nn.BatchNorm2d(out_ch)
        self.bnorm2 = nn.BatchNorm2d(out_ch)
        self.act = activation()
        self.transform = nn.ConvTranspose2d(out_ch, out_ch, 4, 2, 1) if up else nn.Conv2d(out_ch, out_ch, 4, 2, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.bnorm1(self.act(self.conv1(x)))
        h = h + self.act(self.time_mlp(temb))[:, :, None, None]
        h = self.bnorm2(self.act(self.conv2(h)))
        return self.transform(h)


class SimpleUNet(nn.Module):
    """Channels ``base_channels * channel_mult[i]``; ``len(channel_mult) - 1`` halvings of the image.
    ``num_classes``: a class embedding added to the time embedding, as in :class:`diffusion.models.UNet`."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 4, 8, 16),
        time_emb_dim: int = 32,
        activation: str = "relu",
        out_channels: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        checked = check_simple_unet(in_channels, image_size, base_channels, channel_mult, time_emb_dim, activation,
                                    out_channels, num_classes)
        channel_mult, self.divisor = checked["channel_mult"], checked["divisor"]
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels or in_channels, image_size
        act = ACTIVATIONS[activation]
        chans = [base_channels * m for m in channel_mult]
        self.time_dim = time_emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_emb_dim, time_emb_dim), act())
        self.num_classes = num_classes
        self.class_embed = ClassEmbedding(num_classes, time_emb_dim) if num_classes is not None else None
        self.conv0 = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.downs = nn.ModuleList(SimpleBlock(chans[i], chans[i + 1], time_emb_dim, False, act) for i in range(len(chans) - 1))
        up = chans[::-1]
        self.ups = nn.ModuleList(SimpleBlock(up[i], up[i + 1], time_emb_dim, True, act) for i in range(len(up) - 1))
        self.output = nn.Conv2d(chans[0], self.out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by {self.divisor} as this UNet needs")
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.class_embed is not None:
            temb = temb + self.class_embed(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("class labels given to an unconditional SimpleUNet (model.num_classes is null)")
        h = self.conv0(x)
        skips = []
        for block in self.downs:
            h = block(h, temb)
            skips.append(h)
        for block in self.ups:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        return self.output(h)
