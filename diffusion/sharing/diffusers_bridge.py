"""A two-way bridge to diffusers: our UNet <-> ``UNet2DModel``, our schedule/process/sampler <-> ``DDPMScheduler``
(process=gaussian) or ``FlowMatchEulerDiscreteScheduler`` (process=flow with the velocity objective: the same path
x_t = (1 - sigma) x_0 + sigma eps, the network called at 1000 sigma, the step x + (sigma' - sigma) v; ``shift`` is
ours).

The maps are exact (the same function, weight for weight) where both networks compute the same thing, and refused in
one line where they do not. What maps (read from both codes, diffusers 0.42):

- time embedding: ours ``[cos, sin]`` of ``t * exp(-ln(1e4) i / half)`` then Linear-SiLU-Linear = diffusers'
  ``Timesteps(flip_sin_to_cos=True, freq_shift=0)`` + ``TimestepEmbedding`` (``time_embedding_dim`` = our
  ``time_emb_dim``); a class embedding (ours: K classes + the null class K) = ``num_class_embeds=K+1``,
  ``class_embed_type=None`` (the null class is label K there too; DDPMPipeline passes no labels, so a
  class-conditional export is sampled by calling ``unet(x, t, class_labels=y)``);
- residual block (GroupNorm-SiLU-conv, + Linear(SiLU(temb)), GroupNorm-SiLU-dropout-conv, 1x1 skip when the width
  changes) = ``ResnetBlock2D`` (``resnet_time_scale_shift="default"``, output scale 1);
- self-attention (GroupNorm, fused qkv Linear, SDPA at scale 1/sqrt(head dim), proj, residual) = diffusers'
  ``Attention`` (group_norm, to_q/to_k/to_v, to_out.0; the same head split), heads = width / ``attention_head_dim``;
- strided 3x3 conv down, nearest x2 + 3x3 conv up, GroupNorm-SiLU-conv head = ``downsample_type="conv"``
  (padding 1), ``upsample_type="conv"``, ``conv_norm_out``/``conv_out``; a level with attention
  (``attention_resolutions``) = ``AttnDownBlock2D``/``AttnUpBlock2D``; the middle block = ``UNetMidBlock2D``.

Refused (:func:`check_exportable`): ``model=SimpleUNet``, ``block_attention=cbam``, ``skip_gates=true``, GroupNorm
group counts that differ between layers (diffusers has one ``norm_num_groups``: ours map with ``norm_groups`` set, one
count for every layer, or with ``norm_groups=null`` -- ``gcd(32, channels // 4)`` per layer -- where every width gives
the same count, e.g. multiples of 128; an imported UNet2DModel sets ``norm_groups`` where the per-layer rule differs), ``num_heads > 1`` with attention layers of different widths
(diffusers fixes the head *dimension*), the blur process, and on import every ``UNet2DModel`` option our UNet does
not have (fourier/learned time embeddings, ``center_input_sample``, other block types, ...).

Nothing here downloads: folders are local, read with ``json`` and ``safetensors`` (a pickled
``diffusion_pytorch_model.bin`` is refused: it could run code).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from diffusion.models.settings import SPEED_KEYS, suggested_norm_groups
from diffusion.processes.flow import FLOW_TIME_SCALE
from diffusion.processes.settings import continuous_kind
from diffusion.processes.schedules import NoiseSchedule

UNET_TARGET = "diffusion.models.UNet"
UNET_TARGETS = (UNET_TARGET, "diffusion.models.unet.UNet")
GAUSSIAN_TARGETS = ("diffusion.processes.GaussianDiffusion", "diffusion.processes.gaussian.GaussianDiffusion")
#: our objective -> diffusers' prediction_type
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
#: diffusers' variance_type -> our process variance (the _log forms are the same variance computed in logs)
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
#: the key a class-conditional export writes into the UNet's config.json: its last class embedding is our null class
NULL_CLASS_KEY = "_ddpm_null_class"
WEIGHTS = "diffusion_pytorch_model.safetensors"
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", FLOW_SCHEDULER)
#: FlowMatchEulerDiscreteScheduler's options and the one value of each that our flow samplers compute
FLOW_SCHEDULER_FIXED = {"num_train_timesteps": int(FLOW_TIME_SCALE), "use_dynamic_shifting": False, "invert_sigmas": False,
                        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                        "use_beta_sigmas": False, "stochastic_sampling": False}

__all__ = [
    "TrainedBetasSchedule",
    "check_exportable",
    "export_pipeline",
    "from_diffusers_state_dict",
    "import_pipeline",
    "to_diffusers_state_dict",
    "unet2d_config",
    "write_pipeline_folder",
]


class TrainedBetasSchedule(NoiseSchedule):
    """A schedule given by its betas (diffusers' ``trained_betas``): reproduces an imported scheduler's exactly."""

    def __init__(self, betas: list[float]):
        betas = [float(b) for b in betas]
        super().__init__(len(betas))
        self.betas_list = betas

    def betas(self) -> torch.Tensor:
        return torch.tensor(self.betas_list, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"TrainedBetasSchedule(T={self.T})"


# ------------------------------------------------------------------------------------------------ model configs
def _defaults() -> dict:
    import inspect

    from diffusion.models.unet import UNet

    return {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items() if k != "self"}


def _network_config(model_config: dict) -> dict:
    """Our UNet's arguments, defaults filled in (the ``_target_`` and speed switches dropped)."""
    target = model_config.get("_target_", UNET_TARGET)
    if target not in UNET_TARGETS:
        name = str(target).rsplit(".", 1)[-1]
        raise ValueError(f"model={name} cannot be exported to diffusers: only diffusion.models.UNet maps onto UNet2DModel")
    args = {k: v for k, v in model_config.items() if k != "_target_" and k not in SPEED_KEYS}
    defaults = _defaults()
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not an option of diffusion.models.UNet")
    cfg = {**defaults, **args}
    cfg["channel_mult"] = [int(m) for m in cfg["channel_mult"]]
    cfg["attention_resolutions"] = [int(r) for r in (cfg["attention_resolutions"] or [])]
    if cfg["norm_groups"] == "auto":  # the one count the UNet resolves it to
        cfg["norm_groups"] = suggested_norm_groups(_layer_widths(cfg))
    return cfg


def _layer_widths(cfg: dict) -> list[int]:
    """The channel count of every GroupNorm of our UNet with this config, in construction order."""
    from diffusion.models.settings import norm_widths

    res = [cfg["image_size"] // 2**i for i in range(len(cfg["channel_mult"]))]
    return norm_widths(cfg["base_channels"], cfg["channel_mult"], cfg["num_res_blocks"], res,
                       cfg["attention_resolutions"], cfg["block_attention"])


def _groups(channels: int, norm_groups: int | None = None) -> int:
    from diffusion.models.blocks import group_norm

    return group_norm(channels, norm_groups).num_groups


def _attention_widths(cfg: dict) -> list[int]:
    base, mult = cfg["base_channels"], cfg["channel_mult"]
    res = [cfg["image_size"] // 2**i for i in range(len(mult))]
    blocks = [base * m for m, r in zip(mult, res) if r in cfg["attention_resolutions"]] if cfg["block_attention"] == "self" else []
    return blocks + [base * mult[-1]]


def check_exportable(model_config: dict, process_config: dict | None = None, sampler_config: dict | None = None) -> None:
    """A one-line ValueError naming the first option of ours that ``UNet2DModel`` + ``DDPMScheduler`` (or
    ``FlowMatchEulerDiscreteScheduler`` for process=flow) cannot represent and what is allowed; None when the network
    (and the process and sampler, if given) map exactly."""
    if process_config is not None:  # the process first: no network setting makes another process exportable
        target = process_config.get("_target_", GAUSSIAN_TARGETS[0])
        name, kind = str(target).rsplit(".", 1)[-1], continuous_kind(target)
        if kind == "flow":
            objective = process_config.get("objective", "v")
            if objective != "v":
                raise ValueError(f"process.objective={objective} cannot be exported to diffusers with process=flow: "
                                 f"{FLOW_SCHEDULER} steps on the velocity (allowed: v)")
            if (sampler_config or {}).get("clip_denoised"):
                raise ValueError(f"sampler.clip_denoised=true cannot be exported to diffusers with process=flow: "
                                 f"{FLOW_SCHEDULER} does not clip (allowed: false)")
        elif kind == "edm":
            # EDMEulerScheduler holds the same preconditioning, but DDPMPipeline (the UNet2DModel pipeline) neither
            # scales its first noise by init_noise_sigma nor calls scale_model_input: a folder it loads would sample noise
            raise ValueError("process=edm cannot be exported to diffusers: DDPMPipeline, the unconditional "
                             "UNet2DModel pipeline, neither scales its first noise by sigma_max nor calls "
                             "scale_model_input, which EDMEulerScheduler needs (export format=safetensors, which every "
                             "CLI of this framework reads)")
        elif target not in GAUSSIAN_TARGETS:
            raise ValueError(f"process={name} cannot be exported to diffusers: DDPMScheduler "
                             "is Gaussian diffusion (allowed: process=gaussian)")
        objective = process_config.get("objective", "eps")
        if target in GAUSSIAN_TARGETS and objective not in PREDICTION_TYPES:
            raise ValueError(f"process.objective={objective} cannot be exported to diffusers: allowed {', '.join(PREDICTION_TYPES)}")
    cfg = _network_config(model_config)
    if cfg["block_attention"] == "cbam":
        raise ValueError("model.block_attention=cbam cannot be exported to diffusers: UNet2DModel has only "
                         "self-attention blocks (allowed: self, none)")
    if cfg["skip_gates"]:
        raise ValueError("model.skip_gates=true cannot be exported to diffusers: UNet2DModel has no attention gates "
                         "on its skip connections (allowed: false)")
    groups, widths = {}, _layer_widths(cfg)
    for w in widths:
        groups.setdefault(_groups(w, cfg["norm_groups"]), w)
    if len(groups) > 1:
        listed = ", ".join(f"{g} at {w} channels" for g, w in sorted(groups.items()))
        fits = suggested_norm_groups(widths)
        raise ValueError(f"model.base_channels={cfg['base_channels']} channel_mult={cfg['channel_mult']} cannot be "
                         f"exported to diffusers: its GroupNorms have different group counts ({listed}; ours are "
                         "gcd(32, channels // 4) with model.norm_groups=null) and UNet2DModel has one norm_num_groups: "
                         f"train with one count for every layer, model.norm_groups={fits} here")
    heads = cfg["num_heads"]
    widths = sorted(set(_attention_widths(cfg)))
    if heads > 1 and len(widths) > 1:
        raise ValueError(f"model.num_heads={heads} cannot be exported to diffusers with attention at widths {widths}: "
                         "UNet2DModel fixes the head dimension, not the head count (allowed: num_heads=1, or "
                         "attention only at levels of one width)")
    if cfg["out_channels"] not in (None, cfg["in_channels"]):
        raise ValueError(f"model.out_channels={cfg['out_channels']} cannot be exported to diffusers: "
                         f"allowed: null or in_channels={cfg['in_channels']}")


def unet2d_config(model_config: dict) -> dict:
    """``UNet2DModel`` keyword arguments computing exactly what our UNet with ``model_config`` computes."""
    check_exportable(model_config)
    cfg = _network_config(model_config)
    base, mult = cfg["base_channels"], cfg["channel_mult"]
    widths = [base * m for m in mult]
    res = [cfg["image_size"] // 2**i for i in range(len(mult))]
    attn = set(cfg["attention_resolutions"]) if cfg["block_attention"] == "self" else set()
    out = (cfg["out_channels"] or cfg["in_channels"]) * (2 if cfg["learn_sigma"] else 1)
    config = {
        "sample_size": cfg["image_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": out,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None if cfg["time_emb_dim"] in (None, 4 * base) else cfg["time_emb_dim"],
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res)],
        "block_out_channels": widths,
        "layers_per_block": cfg["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(cfg["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": None if cfg["num_heads"] == 1 else _attention_widths(cfg)[0] // cfg["num_heads"],
        "norm_num_groups": _groups(widths[0], cfg["norm_groups"]),
        "attn_norm_num_groups": None,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if cfg["num_classes"] is None else cfg["num_classes"] + 1,
    }
    return config


def _their_config(unet_config: dict) -> dict:
    """Our UNet config (``_target_`` included) for a ``UNet2DModel`` config, or a one-line ValueError naming the first
    option ours does not have."""
    from diffusers import UNet2DModel

    private = {k: v for k, v in unet_config.items() if k.startswith("_")}
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}
    cfg = {**defaults, **{k: v for k, v in unet_config.items() if not k.startswith("_") and k in defaults}}

    def refuse(key: str, allowed: str):
        raise ValueError(f"UNet2DModel {key}={cfg[key]!r} has no counterpart in diffusion.models.UNet (allowed: {allowed})")

    fixed = {"center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
             "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
             "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_eps": 1e-5,
             "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None}
    for key, value in fixed.items():
        if cfg[key] != value and not (isinstance(value, float) and math.isclose(cfg[key], value, rel_tol=0, abs_tol=1e-12)):
            refuse(key, repr(value))
    widths = [int(w) for w in cfg["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        refuse("block_out_channels", f"multiples of the first width {base}")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != len(widths) or any(d not in ("DownBlock2D", "AttnDownBlock2D") for d in down):
        refuse("down_block_types", "DownBlock2D | AttnDownBlock2D, one per block_out_channels")
    mirror = [d.replace("Down", "Up") for d in reversed(down)]
    if up != mirror:
        refuse("up_block_types", f"{mirror} (attention at the same levels as down_block_types)")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            refuse("sample_size", "a square size")
        size = size[0]
    if not isinstance(size, int):
        refuse("sample_size", "an integer image side")
    res = [size // 2**i for i in range(len(widths))]
    attention_resolutions = [r for r, d in zip(res, down) if d == "AttnDownBlock2D"]
    attn_widths = [w for w, d in zip(widths, down) if d == "AttnDownBlock2D"] + [widths[-1]]
    head_dim = cfg["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        refuse("attention_head_dim", "one integer or null")
    if head_dim is None:  # diffusers: one head of the block's width
        heads = 1
    else:
        counts = {w // head_dim for w in attn_widths}
        if any(w % head_dim for w in attn_widths) or len(counts) != 1:
            refuse("attention_head_dim", f"null or a head dimension giving one head count at widths {sorted(set(attn_widths))}")
        heads = counts.pop()
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        refuse("out_channels", f"in_channels={in_ch} or 2 x in_channels (a learned variance)")
    num_classes = None
    if cfg["num_class_embeds"] is not None:
        if NULL_CLASS_KEY not in private:
            raise ValueError(f"UNet2DModel num_class_embeds={cfg['num_class_embeds']} has no null class (the "
                             "unconditional model that diffusion.models.UNet's class embedding holds): only "
                             "class-conditional UNets exported from this framework import")
        num_classes = int(cfg["num_class_embeds"]) - 1
    time_dim = cfg["time_embedding_dim"]
    ours = {
        "_target_": UNET_TARGET,
        "in_channels": in_ch,
        "image_size": size,
        "base_channels": base,
        "channel_mult": [w // base for w in widths],
        "num_res_blocks": int(cfg["layers_per_block"]),
        "attention_resolutions": attention_resolutions,
        "dropout": float(cfg["dropout"]),
        "time_emb_dim": None if time_dim in (None, 4 * base) else int(time_dim),
        "num_heads": heads,
        "gradient_checkpointing": False,
        "learn_sigma": out_ch == 2 * in_ch,
        "block_attention": "self",
        "skip_gates": False,
        "num_classes": num_classes,
    }
    widths = _layer_widths(_network_config(ours))
    groups, attn_groups = sorted({_groups(w) for w in widths}), cfg["attn_norm_num_groups"]
    n = int(cfg["norm_num_groups"])
    if attn_groups not in (None, n) or any(w % n for w in widths):
        raise ValueError(f"UNet2DModel norm_num_groups={n} (attn_norm_num_groups={attn_groups}) has no counterpart in "
                         "diffusion.models.UNet: one group count for every GroupNorm, dividing each width (allowed: "
                         "attn_norm_num_groups null or equal)")
    if groups != [n]:  # the per-layer rule (norm_groups=null) computes something else: one count, as theirs
        ours["norm_groups"] = n
    return ours


# ------------------------------------------------------------------------------------------------ state dicts
def _module_map(cfg: dict) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers' prefix, kind) of every layer, kind in resnet | attention | plain."""
    mult, blocks = cfg["channel_mult"], cfg["num_res_blocks"]
    res = [cfg["image_size"] // 2**i for i in range(len(mult))]
    attn = set(cfg["attention_resolutions"]) if cfg["block_attention"] == "self" else set()
    pairs = [("time_embed.mlp.0", "time_embedding.linear_1", "plain"), ("time_embed.mlp.2", "time_embedding.linear_2", "plain"),
             ("conv_in", "conv_in", "plain"), ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    if cfg["num_classes"] is not None:
        pairs.append(("class_embed", "class_embedding", "plain"))
    i = 0
    for level in range(len(mult)):
        for j in range(blocks):
            pairs.append((f"down.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if res[level] in attn:
                pairs.append((f"down.{i}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            i += 1
        if level != len(mult) - 1:
            pairs.append((f"down.{i}.0", f"down_blocks.{level}.downsamplers.0", "plain"))
            i += 1
    pairs += [("middle.0", "mid_block.resnets.0", "resnet"), ("middle.1", "mid_block.attentions.0", "attention"),
              ("middle.2", "mid_block.resnets.1", "resnet")]
    i = 0
    for k, level in enumerate(reversed(range(len(mult)))):
        for j in range(blocks + 1):
            pairs.append((f"up.{i}.0", f"up_blocks.{k}.resnets.{j}", "resnet"))
            n = 1
            if res[level] in attn:
                pairs.append((f"up.{i}.1", f"up_blocks.{k}.attentions.{j}", "attention"))
                n = 2
            if level and j == blocks:
                pairs.append((f"up.{i}.{n}", f"up_blocks.{k}.upsamplers.0", "plain"))
            i += 1
    return pairs


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "skip": "conv_shortcut"}


def _key_pairs(cfg: dict, ours_keys) -> list[tuple[str, str]]:
    """(our key, diffusers' key) of every tensor but the fused qkv (split in three by the callers)."""
    pairs = []
    for ours, theirs, kind in _module_map(cfg):
        for key in ours_keys:
            if not key.startswith(ours + "."):
                continue
            rest = key[len(ours) + 1:]
            if kind == "resnet":
                layer, _, param = rest.partition(".")
                pairs.append((key, f"{theirs}.{_RESNET[layer]}.{param}"))
            elif kind == "attention":
                layer, _, param = rest.partition(".")
                if layer == "qkv":
                    pairs.append((key, f"{theirs}.to_qkv.{param}"))
                else:
                    pairs.append((key, f"{theirs}.{ {'norm': 'group_norm', 'proj': 'to_out.0'}[layer]}.{param}"))
            else:
                pairs.append((key, f"{theirs}.{rest}"))
    return pairs


def _expected_keys(cfg: dict) -> dict[str, torch.Size]:
    from diffusion.models.unet import UNet

    args = {k: v for k, v in cfg.items() if k not in SPEED_KEYS}
    with torch.device("meta"):
        net = UNet(**args)
    return {k: v.shape for k, v in net.state_dict().items()}


def to_diffusers_state_dict(state_dict: dict, model_config: dict) -> dict:
    """Our network's state dict (keys without the module's ``model.`` prefix) -> ``UNet2DModel``'s, for the config
    :func:`unet2d_config` gives; the same tensors, the fused qkv split into to_q, to_k, to_v."""
    check_exportable(model_config)
    cfg = _network_config(model_config)
    expected = _expected_keys(cfg)
    if set(state_dict) != set(expected):
        extra = sorted(set(state_dict) ^ set(expected))
        raise ValueError(f"the state dict does not belong to a UNet with this config: {extra[0]!r} differs")
    out = {}
    mapped = set()
    for ours, theirs in _key_pairs(cfg, state_dict):
        mapped.add(ours)
        tensor = state_dict[ours]
        if ".to_qkv." in theirs:
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[theirs.replace("to_qkv", name)] = part.clone()
        else:
            out[theirs] = tensor.clone()
    assert mapped == set(state_dict), sorted(set(state_dict) - mapped)  # every tensor has its place
    return out


def from_diffusers_state_dict(unet_state_dict: dict, unet_config: dict) -> tuple[dict, dict]:
    """A ``UNet2DModel`` state dict and config -> (our model config with ``_target_: diffusion.models.UNet``, our
    network's state dict); ValueError (one line) for a config ours cannot represent."""
    ours_cfg = _their_config(unet_config)
    cfg = _network_config(ours_cfg)
    expected = _expected_keys(cfg)
    out, used = {}, set()
    for ours, theirs in _key_pairs(cfg, expected):
        if ".to_qkv." in theirs:
            names = [theirs.replace("to_qkv", n) for n in ("to_q", "to_k", "to_v")]
            missing = [n for n in names if n not in unet_state_dict]
            if missing:
                raise ValueError(f"the UNet2DModel state dict lacks {missing[0]!r}")
            out[ours] = torch.cat([unet_state_dict[n] for n in names], dim=0).clone()
            used.update(names)
        else:
            if theirs not in unet_state_dict:
                raise ValueError(f"the UNet2DModel state dict lacks {theirs!r}")
            out[ours] = unet_state_dict[theirs].clone()
            used.add(theirs)
    extra = sorted(set(unet_state_dict) - used)
    if extra:
        raise ValueError(f"the UNet2DModel state dict holds {extra[0]!r}, which its config does not explain")
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"the UNet2DModel tensor for {key!r} has shape {tuple(out[key].shape)}, expected {tuple(shape)}")
    return ours_cfg, out


# ------------------------------------------------------------------------------------------------ pipelines
def _scheduler_config(module) -> dict:
    process = module.process
    if process.kind == "flow":
        return {**FLOW_SCHEDULER_FIXED, "shift": float(process.shift)}
    return {
        "num_train_timesteps": int(process.num_timesteps),
        "trained_betas": process.betas.detach().cpu().float().tolist(),
        "variance_type": process.variance,
        "prediction_type": PREDICTION_TYPES[process.objective],
        "clip_sample": bool(module.sampler.clip_denoised),
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def export_pipeline(module, out_dir) -> Path:
    """Write ``module``'s network (the weights it holds: the EMA ones when loaded with ``from_checkpoint``) as a
    ``DDPMPipeline`` folder -- ``unet/`` (``UNet2DModel``, safetensors) + ``scheduler/`` (``DDPMScheduler`` with our
    betas as ``trained_betas``, ``prediction_type`` from the objective, ``variance_type`` from the process variance,
    ``clip_sample`` from the sampler's ``clip_denoised``; for process=flow ``FlowMatchEulerDiscreteScheduler`` with
    our ``shift``) -- that ``DDPMPipeline.from_pretrained(out_dir)`` loads.

    Refuses (one line, before writing anything) what does not map (:func:`check_exportable`) and a used ``out_dir``."""
    from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    from diffusion.models.speed import split_speed_options

    hparams = module.hparams
    network_cfg, _ = split_speed_options(dict(hparams["model"]))
    check_exportable(network_cfg, dict(hparams.get("process") or {}), {"clip_denoised": module.sampler.clip_denoised})
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out={out_dir} already exists and is not empty: choose a new folder (nothing is overwritten)")
    net = getattr(module.model, "_orig_mod", module.model)
    state = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    config = unet2d_config(network_cfg)
    unet = UNet2DModel(**config)
    unet.load_state_dict(to_diffusers_state_dict(state, network_cfg), strict=True)
    flow = module.process.kind == "flow"
    scheduler = (FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler)(**_scheduler_config(module))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    if config["num_class_embeds"] is not None:  # our null class is the last embedding: say so for the import
        path = out_dir / "unet" / "config.json"
        data = json.loads(path.read_text())
        data[NULL_CLASS_KEY] = config["num_class_embeds"] - 1
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_pipeline_folder(module, out: str | Path) -> Path:
    """:func:`export_pipeline` into ``out``, complete or absent: written under a temporary name beside it, then renamed
    into place (a full disk or a refusal leaves nothing at ``out``)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        export_pipeline(module, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_unet(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config_path, weights = folder / "config.json", folder / WEIGHTS
    if not config_path.is_file():
        raise ValueError(f"ckpt={folder} holds no config.json: pass a UNet2DModel or DDPMPipeline folder (save_pretrained)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"ckpt={folder} holds a {config['_class_name']}: only UNet2DModel maps onto diffusion.models.UNet")
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.name.startswith("diffusion_pytorch_model"))
        hint = " (a .bin is a pickle, which could run code: convert it with save_pretrained(..., safe_serialization=True))" if found else ""
        raise ValueError(f"ckpt={folder} holds no {WEIGHTS}{hint}")
    return config, load_file(str(weights))


def _schedule_from(config: dict) -> dict:
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler rescale_betas_zero_snr=true has no counterpart here (allowed: false)")
    if config.get("trained_betas") is not None:
        return {"_target_": "diffusion.sharing.diffusers_bridge.TrainedBetasSchedule", "betas": [float(b) for b in config["trained_betas"]]}
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return {"_target_": "diffusion.processes.schedules.LinearSchedule", "T": T, "beta_start": start, "beta_end": end, "scale_with_T": False}
    if kind == "scaled_linear":
        return {"_target_": "diffusion.processes.schedules.QuadraticSchedule", "T": T, "beta_start": start, "beta_end": end, "scale_with_T": False}
    if kind == "sigmoid":
        return {"_target_": "diffusion.processes.schedules.SigmoidSchedule", "T": T, "beta_start": start, "beta_end": end, "scale_with_T": False}
    if kind == "squaredcos_cap_v2" and config.get("alpha_transform_type", "cosine") == "cosine":
        return {"_target_": "diffusion.processes.schedules.CosineSchedule", "T": T, "s": 0.008, "max_beta": 0.999}
    raise ValueError(f"scheduler beta_schedule={kind!r} has no counterpart here "
                     "(allowed: linear, scaled_linear, sigmoid, squaredcos_cap_v2, or trained_betas)")


def _flow_from(config: dict, model: dict) -> dict:
    """A FlowMatchEulerDiscreteScheduler's config -> process=flow (velocity, its ``shift``), schedule=none and
    conf/sampler/flow_euler.yaml; refused where our flow samplers compute something else."""
    from diffusion.samplers.registry import sampler_config

    for key, value in FLOW_SCHEDULER_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"scheduler {key}={config[key]!r} has no counterpart in our flow samplers (allowed: {value!r})")
    if model["learn_sigma"]:
        raise ValueError(f"UNet2DModel out_channels={model.get('out_channels')} does not fit {FLOW_SCHEDULER}: "
                         "a flow network predicts a velocity with the input's channels")
    process = {"_target_": "diffusion.processes.FlowMatching", "_partial_": True, "objective": "v", "shift": float(config.get("shift", 1.0))}
    return {"schedule": {"_target_": "diffusion.processes.schedules.NoSchedule"}, "process": process,
            "sampler": sampler_config("flow_euler")}


def import_pipeline(path) -> dict:
    """A local diffusers folder -> ``{"model", "state_dict", "schedule", "process", "sampler"}`` in the layout of
    ``DiffusionModule``'s hyper-parameters (``model``, ``schedule``, ``process``, ``sampler`` configs) plus our
    network's state dict, for ``DiffusionModule(...)`` then ``module.model.load_state_dict(state_dict)``.

    ``path`` holds a ``DDPMPipeline`` (``model_index.json``, ``unet/``, ``scheduler/``) or a ``UNet2DModel``
    (``config.json`` + ``diffusion_pytorch_model.safetensors``). A UNet without a scheduler is taken with
    ``DDPMScheduler``'s defaults: linear betas 1e-4..0.02 over T=1000, epsilon prediction, fixed_small variance,
    clip_sample=true. The schedule is ``LinearSchedule``/``QuadraticSchedule``/``SigmoidSchedule``/``CosineSchedule``
    for diffusers' ``beta_schedule`` linear/scaled_linear/sigmoid/squaredcos_cap_v2, and :class:`TrainedBetasSchedule`
    (the betas themselves) for ``trained_betas``. The sampler is conf/sampler/ddim.yaml's DDIM with ``clip_denoised``
    from the scheduler's ``clip_sample``. A ``FlowMatchEulerDiscreteScheduler`` gives process=flow (the velocity, its
    ``shift``) sampled with conf/sampler/flow_euler.yaml. Nothing is downloaded; a pickled ``.bin`` is refused."""
    from diffusion.samplers.registry import sampler_config

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"ckpt={root} is not a folder: pass a local UNet2DModel or DDPMPipeline folder")
    scheduler_cfg: dict = {}
    if (root / "model_index.json").is_file():
        index = json.loads((root / "model_index.json").read_text())
        if "unet" not in index:
            raise ValueError(f"ckpt={root} is a {index.get('_class_name')} without a unet: only UNet2DModel pipelines import")
        unet_dir = root / "unet"
        if "scheduler" in index:
            name = index["scheduler"][1] if isinstance(index["scheduler"], list) else None
            if name not in SCHEDULERS:
                raise ValueError(f"ckpt={root} has a {name} scheduler: allowed {', '.join(SCHEDULERS)}")
            scheduler_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    else:
        unet_dir = root
    unet_config, unet_state = _read_unet(unet_dir)
    model, state_dict = from_diffusers_state_dict(unet_state, unet_config)
    if scheduler_cfg.get("_class_name") == FLOW_SCHEDULER:
        return {"model": model, "state_dict": state_dict, **_flow_from(scheduler_cfg, model)}
    if scheduler_cfg.get("thresholding"):
        raise ValueError("scheduler thresholding=true has no counterpart in our samplers (allowed: false)")
    prediction = scheduler_cfg.get("prediction_type", "epsilon")
    objectives = {v: k for k, v in PREDICTION_TYPES.items()}
    if prediction not in objectives:
        raise ValueError(f"scheduler prediction_type={prediction!r} has no counterpart here (allowed: {', '.join(objectives)})")
    variance_type = scheduler_cfg.get("variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"scheduler variance_type={variance_type!r} has no counterpart here (allowed: {', '.join(VARIANCE_TYPES)})")
    variance = VARIANCE_TYPES[variance_type]
    if model["learn_sigma"] != (variance == "learned_range"):
        raise ValueError(f"scheduler variance_type={variance_type!r} does not fit UNet2DModel out_channels="
                         f"{unet_config.get('out_channels')} for in_channels={unet_config.get('in_channels')} "
                         "(a learned variance, learned_range, needs twice the input channels)")
    if scheduler_cfg.get("clip_sample", True) and float(scheduler_cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"scheduler clip_sample_range={scheduler_cfg['clip_sample_range']} has no counterpart here (allowed: 1.0)")
    schedule = _schedule_from(scheduler_cfg)
    process = {"_target_": "diffusion.processes.GaussianDiffusion", "_partial_": True, "objective": objectives[prediction],
               "variance": "fixed_small" if variance == "learned_range" else variance}
    sampler = sampler_config("ddim", clip_denoised=bool(scheduler_cfg.get("clip_sample", True)))
    return {"model": model, "state_dict": state_dict, "schedule": schedule, "process": process, "sampler": sampler}

