"""Speed switches that apply to any network, set from the model config (``model.channels_last``, ``model.compile``).

They change how the network runs, never what it computes or what its checkpoint holds: the state dict keys
stay the same, so a checkpoint trained with them loads without them and the other way round.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.models.settings import SPEED_KEYS, check_speed


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.dim() == 4 else args


def split_speed_options(config: dict) -> tuple[dict, dict]:
    """(the network's own config, the speed options) from a model config."""
    options = {k: config[k] for k in SPEED_KEYS if k in config}
    return {k: v for k, v in config.items() if k not in SPEED_KEYS}, options


def apply_speed_options(model: nn.Module, channels_last: bool = False, compile: bool | str = False) -> nn.Module:
    """``channels_last``: NHWC weights and inputs (faster convolutions on tensor cores and oneDNN).
    ``compile``: ``torch.compile`` of the network's forward in place (``nn.Module.compile``), used by training,
    sampling and evaluation alike; ``true`` or a torch.compile mode name."""
    check_speed(channels_last, compile)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_inputs_channels_last)
    if compile:
        model.compile(mode=None if compile is True else compile)
    return model
