"""The DDPM UNet (Ho et al. 2020; Nichol & Dhariwal 2021 layout) predicting epsilon."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.models.blocks import (
    CBAM,
    AttentionBlock,
    AttentionGate,
    ClassEmbedding,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    group_norm,
)
from diffusion.models.settings import check_unet


class EmbedSequential(nn.ModuleList):
    """A sequence of layers that all take ``(x, temb)``."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, temb)
        return x


class UNet(nn.Module):
    """Residual UNet with a sinusoidal time embedding injected into every residual block.

    Args:
        in_channels: image channels (1 for digits/MNIST, 3 for RGB); ``out_channels`` defaults to it.
        image_size: side of the square input; it must be divisible by ``2 ** (len(channel_mult) - 1)``.
        base_channels: width of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level; each level after the first halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (in pixels, e.g. ``[16, 8]``, among the levels'
            :func:`~diffusion.models.settings.level_resolutions`) whose blocks get self-attention; the middle block
            always has it. The config's default is the deepest level (:func:`~diffusion.models.settings.deepest_resolution`).
        dropout: dropout inside residual blocks.
        time_emb_dim: width of the time embedding MLP (default ``4 * base_channels``).
        num_heads: attention heads.
        gradient_checkpointing: recompute block activations in the backward pass to save memory.
        learn_sigma: also output the reverse-process variance (Nichol & Dhariwal): twice the output channels.
        block_attention: what the blocks at ``attention_resolutions`` get: ``self`` (self-attention), ``cbam``
            (channel + spatial attention, Woo et al.) or ``none`` (only the middle block's self-attention).
        skip_gates: attention gates (Oktay et al.) on every skip connection, driven by the decoder's features.
        num_classes: null for an unconditional network; K for a class-conditional one, ``forward(x, t, y)`` with y in
            0..K-1, or K (or ``y=None``) for "no class": a class embedding added to the time embedding
            (:class:`ClassEmbedding`). ``diffusion.train`` sets it from the data (``data.conditional=true``).
        norm_groups: the group count of every GroupNorm (it must divide each one's channels: diffusers'
            ``norm_num_groups``, so that the network exports); ``auto``: the largest of 32, 16, ..., 1 that divides
            every width and leaves the narrowest >= 4 channels a group (32 where every width is a multiple of 128,
            4 for the digits default); null: gcd(32, channels // 4) per layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        time_emb_dim: int | None = None,
        num_heads: int = 1,
        out_channels: int | None = None,
        gradient_checkpointing: bool = False,
        learn_sigma: bool = False,
        block_attention: str = "self",
        skip_gates: bool = False,
        num_classes: int | None = None,
        norm_groups: int | None = None,
    ):
        super().__init__()
        checked = check_unet(in_channels, image_size, base_channels, channel_mult, num_res_blocks, attention_resolutions,
                             dropout, time_emb_dim, num_heads, out_channels, gradient_checkpointing, learn_sigma,
                             block_attention, skip_gates, num_classes, norm_groups)
        g = checked["norm_groups"]  # null (per layer), or one count ("auto" resolved)
        channel_mult, attention_resolutions = checked["channel_mult"], checked["attention_resolutions"]
        time_emb_dim, divisor, resolutions = checked["time_emb_dim"], checked["divisor"], checked["resolutions"]
        self.in_channels = in_channels
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = (out_channels or in_channels) * (2 if self.learn_sigma else 1)
        self.image_size = image_size
        self.divisor = divisor
        self.gradient_checkpointing = bool(gradient_checkpointing)

        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(base_channels, time_emb_dim)
        self.class_embed = ClassEmbedding(num_classes, time_emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def attn(ch: int, res: int) -> list[nn.Module]:
            if res not in attention_resolutions or block_attention == "none":
                return []
            return [AttentionBlock(ch, num_heads, g) if block_attention == "self" else CBAM(ch)]

        self.down = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            res = resolutions[level]
            for _ in range(num_res_blocks):
                self.down.append(EmbedSequential([ResBlock(ch, base_channels * mult, time_emb_dim, dropout, g)] + attn(base_channels * mult, res)))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(EmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = EmbedSequential(
            [ResBlock(ch, ch, time_emb_dim, dropout, g), AttentionBlock(ch, num_heads, g), ResBlock(ch, ch, time_emb_dim, dropout, g)]
        )

        self.up = nn.ModuleList()
        self.gates = nn.ModuleList() if skip_gates else None
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                if self.gates is not None:
                    self.gates.append(AttentionGate(skip, ch))
                layers = [ResBlock(ch + skip, base_channels * mult, time_emb_dim, dropout, g)]
                ch = base_channels * mult
                layers += attn(ch, res)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbedSequential(layers))

        self.out = nn.Sequential(group_norm(ch, g), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def _run(self, block: EmbedSequential, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, temb, use_reentrant=False)
        return block(h, temb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by {self.divisor} as this UNet needs")
        temb = self.time_embed(t)
        if self.class_embed is not None:
            temb = temb + self.class_embed(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("class labels given to an unconditional UNet (model.num_classes is null)")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            skips.append(h)
        h = self._run(self.middle, h, temb)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            if self.gates is not None:
                skip = self.gates[i](skip, h)
            h = self._run(block, torch.cat([h, skip], dim=1), temb)
        return self.out(h)
