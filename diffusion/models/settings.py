"""The networks' settings, checked without torch: each network's constructor calls its check here (the one copy of
its rules), and ``diffusion.train`` calls :func:`check_network` on ``model.*`` before it imports torch, so that
``model.base_channels=-1`` is refused in one line before any heavy import or any work.

``check_unet`` / ``check_simple_unet`` take exactly their network's constructor arguments, with the same defaults
(``tests/test_cli_startup.py`` compares the signatures).
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusion.checks import check_choice, check_positive_int

#: model-config keys that change how a network runs, never what it computes (:mod:`diffusion.models.speed`); the
#: network's constructor never sees them
SPEED_KEYS = ("channels_last", "compile")
COMPILE_CHOICES = (False, True, "default", "reduce-overhead", "max-autotune")
#: what a UNet's blocks at ``attention_resolutions`` get
BLOCK_ATTENTION = ("none", "self", "cbam")
#: the SimpleUNet's activations (its module maps each name to its torch class)
ACTIVATION_NAMES = ("relu", "leaky_relu")


def level_resolutions(image_size: int, channel_mult: Sequence[int]) -> list[int]:
    """The side of each level of a UNet with these levels: level ``i`` works at ``image_size / 2**i`` pixels."""
    return [int(image_size) // 2**i for i in range(len(channel_mult))]


def deepest_resolution(image_size: int, channel_mult: Sequence[int]) -> int:
    """The side of the UNet's last (lowest-resolution) level: conf/model/unet.yaml's default
    ``attention_resolutions`` (``${deepest_resolution:${data.image_size},${model.channel_mult}}``), so that the
    default model fits any image size: 4 px for the digits default (16 px, three levels), 16 px at 64 px, 7 px at 28 px."""
    levels = level_resolutions(image_size, channel_mult)
    return levels[-1] if levels else int(image_size)  # no levels: check_unet refuses channel_mult=[] in its own words


def check_num_classes(num_classes) -> int | None:
    """None (unconditional) or an integer >= 2, else a one-line ValueError."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"model num_classes={num_classes!r} is invalid: it must be null (unconditional) or an integer >= 2")
    return num_classes


def check_halvings(image_size: int, channel_mult: tuple) -> int:
    """``2 ** (levels - 1)``, which must divide ``image_size`` (each level after the first halves it)."""
    divisor = 2 ** (len(channel_mult) - 1)
    if image_size % divisor:
        raise ValueError(f"model image_size={image_size} cannot be halved {len(channel_mult) - 1} times for "
                         f"channel_mult={list(channel_mult)}: use a multiple of {divisor} or fewer levels")
    return divisor


def _positive_ints(value) -> bool:
    return all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value)


def norm_widths(base_channels: int, channel_mult: Sequence[int], num_res_blocks: int, resolutions: Sequence[int],
                attention_resolutions: Sequence[int], block_attention: str = "self") -> list[int]:
    """The channel count of every GroupNorm of :class:`diffusion.models.UNet` with these settings, in construction
    order: each residual block's two, each self-attention block's, the middle block's five, the output head's
    (concatenated skips included on the way up)."""
    base, mult = base_channels, list(channel_mult)
    attn = set(attention_resolutions) if block_attention == "self" else set()
    widths, skips, ch = [], [base], base
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            widths += [ch, base * m] + ([base * m] if resolutions[level] in attn else [])
            ch = base * m
            skips.append(ch)
        if level != len(mult) - 1:
            skips.append(ch)
    widths += [ch, ch, ch, ch, ch]  # middle: resblock (2 norms), attention, resblock (2 norms)
    for level, m in reversed(list(enumerate(mult))):
        for _ in range(num_res_blocks + 1):
            widths += [ch + skips.pop(), base * m] + ([base * m] if resolutions[level] in attn else [])
            ch = base * m
    return widths + [ch]


def suggested_norm_groups(widths) -> int:
    """The largest count in 32, 16, ..., 1 dividing every width and leaving the narrowest >= 4 channels a group (one
    channel a group is instance norm: see :func:`diffusion.models.blocks.group_norm`)."""
    fits = [g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths)]
    return next((g for g in fits if min(widths) // g >= 4), fits[-1])


def check_unet(
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
) -> dict:
    """:class:`diffusion.models.UNet`'s arguments, checked; returns the derived ones (``channel_mult`` and
    ``attention_resolutions`` as tuples, ``time_emb_dim`` resolved, ``divisor``, ``resolutions``)."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    check_positive_int("base_channels", base_channels)
    check_positive_int("num_res_blocks", num_res_blocks)
    check_positive_int("num_heads", num_heads)
    channel_mult = tuple(channel_mult)
    if not channel_mult or not _positive_ints(channel_mult):
        raise ValueError(f"model channel_mult={list(channel_mult)} is invalid: it must be a non-empty list of positive integers")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ValueError(f"model dropout={dropout!r} is invalid: it must lie in [0, 1)")
    divisor = check_halvings(image_size, channel_mult)
    resolutions = level_resolutions(image_size, channel_mult)
    attention_resolutions = tuple(attention_resolutions or ())
    unknown = [r for r in attention_resolutions if r not in resolutions]
    if unknown:
        raise ValueError(f"model attention_resolutions={list(attention_resolutions)} is invalid: {unknown} not among "
                         f"the network's resolutions {resolutions}")
    check_choice("model block_attention", block_attention, BLOCK_ATTENTION)
    if out_channels is not None:
        check_positive_int("out_channels", out_channels)
    check_num_classes(num_classes)
    time_emb_dim = 4 * base_channels if time_emb_dim is None else check_positive_int("time_emb_dim", time_emb_dim)
    if norm_groups is not None:
        widths = sorted(set(norm_widths(base_channels, channel_mult, num_res_blocks, resolutions, attention_resolutions,
                                        block_attention)))
        if norm_groups == "auto":
            norm_groups = suggested_norm_groups(widths)
        if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
            raise ValueError(f"model norm_groups={norm_groups!r} is invalid: it must be a positive integer, auto (one count "
                             "that fits every width) or null (gcd(32, channels // 4) per layer)")
        if any(w % norm_groups for w in widths):
            fits = suggested_norm_groups(widths)
            raise ValueError(f"model norm_groups={norm_groups} is invalid: it must divide the channel count of every "
                             f"GroupNorm ({', '.join(map(str, widths))} here), e.g. {fits}; null: gcd(32, channels // 4) per layer")
    return {"channel_mult": channel_mult, "attention_resolutions": attention_resolutions, "time_emb_dim": time_emb_dim,
            "divisor": divisor, "resolutions": resolutions, "norm_groups": norm_groups}


def check_simple_unet(
    in_channels: int = 1,
    image_size: int = 32,
    base_channels: int = 64,
    channel_mult: Sequence[int] = (1, 2, 4, 8, 16),
    time_emb_dim: int = 32,
    activation: str = "relu",
    out_channels: int | None = None,
    num_classes: int | None = None,
) -> dict:
    """:class:`diffusion.models.SimpleUNet`'s arguments, checked; returns ``channel_mult`` (a tuple) and ``divisor``."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    check_positive_int("base_channels", base_channels)
    check_positive_int("time_emb_dim", time_emb_dim)
    channel_mult = tuple(channel_mult)
    if len(channel_mult) < 2 or not _positive_ints(channel_mult):
        raise ValueError(f"model channel_mult={list(channel_mult)} is invalid: it needs at least two positive integers")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"model activation={activation!r} is invalid: allowed values are {', '.join(ACTIVATION_NAMES)}")
    if out_channels is not None:
        check_positive_int("out_channels", out_channels)
    check_num_classes(num_classes)
    return {"channel_mult": channel_mult, "divisor": check_halvings(image_size, channel_mult)}


def check_speed(channels_last: bool = False, compile: bool | str = False) -> None:
    """``model.channels_last`` (a boolean) and ``model.compile`` (false, true or a torch.compile mode)."""
    if not isinstance(channels_last, bool):
        raise ValueError(f"model channels_last={channels_last!r} is invalid: it must be true or false")
    if not isinstance(compile, bool) and compile not in COMPILE_CHOICES[2:]:
        raise ValueError(f"model compile={compile!r} is invalid: allowed values are false, true, default, "
                         "reduce-overhead, max-autotune")


#: the checks of this framework's networks, by the ``_target_`` a model config names (a user's own network is
#: checked by its own constructor, once torch is loaded)
NETWORK_CHECKS = {"diffusion.models.UNet": check_unet, "diffusion.models.unet.UNet": check_unet,
                  "diffusion.models.SimpleUNet": check_simple_unet,
                  "diffusion.models.simple_unet.SimpleUNet": check_simple_unet}


def check_network(model: dict, image_size: int | None = None, in_channels: int | None = None) -> None:
    """A ``model`` config (``_target_`` and its settings, speed switches included) checked without torch: an
    unknown key, or any value the network's constructor would refuse; ``image_size`` / ``in_channels`` are the data's
    (``diffusion.train`` sets them on the network), when known. One-line ValueError naming the value."""
    import inspect

    settings = {k: v for k, v in model.items() if k != "_target_"}
    check_speed(**{k: settings.pop(k) for k in SPEED_KEYS if k in settings})
    check = NETWORK_CHECKS.get(model.get("_target_"))
    if check is None:
        return
    allowed = list(inspect.signature(check).parameters)
    unknown = sorted(set(settings) - set(allowed) - {"in_channels", "image_size"})
    if unknown:
        name = model["_target_"].rsplit(".", 1)[-1]
        raise ValueError(f"model.{unknown[0]} is not a setting of {name}: its settings are "
                         f"{', '.join(a for a in allowed if a not in ('in_channels', 'image_size'))}, {', '.join(SPEED_KEYS)}")
    # in_channels and image_size follow the data (diffusion.train sets them): the data's, when known
    settings.update(in_channels=in_channels or 1, image_size=image_size or 2**16)
    if image_size is None:  # the data's size is not known yet: check everything that does not depend on it
        settings.pop("attention_resolutions", None)
    check(**settings)
