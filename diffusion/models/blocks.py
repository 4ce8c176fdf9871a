"""Building blocks shared by the networks: timestep embedding, residual block, self-attention, resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ClassEmbedding(nn.Embedding):
    """One learned vector per class plus one for the "null" class (index ``num_classes``), of the time embedding's
    width, added to it (improved-diffusion's ``label_emb``; Ho & Salimans 2022 train the null class by dropping
    labels). ``y=None`` is the null class for the whole batch: the unconditional model."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor | None, batch: int | None = None, device=None) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return super().forward(y)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP (Ho et al.)."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base_dim))


def group_norm(channels: int, groups: int | None = None, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or (None) up to 32 groups of at least 4 channels: gcd(32, channels // 4),
    32 groups from 128 channels up, as in DDPM.

    One channel per group would be instance norm, which removes the per-channel time-embedding offset that the
    residual block adds before its second norm: narrow models would then ignore the timestep. One count for every
    layer (``UNet(norm_groups=8)``) is what diffusers' ``UNet2DModel`` has (``norm_num_groups``).
    """
    return nn.GroupNorm(groups or math.gcd(max_groups, max(channels // 4, 1)), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, time embedding added, GroupNorm -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0, norm_groups: int | None = None):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, through ``scaled_dot_product_attention``.

    The q/k/v and output projections are linear layers on the (B, HW, C) tokens: the same maps as 1x1
    convolutions, but a single matrix multiply each instead of a convolution call (3-5% of a training step of
    the digits default on a CPU).
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model num_heads={num_heads} is invalid: it must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b l (three n c) -> three b n l c", three=3, n=self.num_heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b n l c -> b l (n c)")
        return x + rearrange(self.proj(out), "b (h w) c -> b c h w", h=h, w=w)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel attention from average- and max-pooled
    descriptors through a shared MLP, then spatial attention from a 7x7 convolution over the channel-wise average
    and max maps; both multiply the features."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * channel
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, Attention U-Net): the decoder's features
    ``g`` decide, per position, how much of the encoder's skip ``x`` passes: x * sigmoid(psi(relu(W_x x + W_g g)))."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(skip_channels // 2, 4)
        self.w_x = nn.Conv2d(skip_channels, inter, 1, bias=False)
        self.w_g = nn.Conv2d(gate_channels, inter, 1)
        self.psi = nn.Conv2d(inter, 1, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.psi(F.relu(self.w_x(x) + self.w_g(g))))
