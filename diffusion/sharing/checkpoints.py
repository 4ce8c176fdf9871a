"""The one way a checkpoint file is read: ``torch.load(weights_only=True)`` with an explicit allow-list.

A checkpoint is a pickle, and unpickling runs whatever callables the file names: opening a ``.ckpt`` someone sent
with ``weights_only=False`` runs their code. This framework's checkpoints hold only tensors and plain data (its
hyper-parameters are plain dicts, lists, strings and numbers; Lightning's loop, callback and optimizer states the
same), which torch's weights-only unpickler reads without running anything. :data:`ALLOWED_GLOBALS` lists the
classes beyond those that a checkpoint may hold (none today); a file that names any other global is refused in one
line naming it, before any of it is built. ``trust_checkpoint=true`` (every CLI that reads a checkpoint) is the
explicit way to open an old or foreign file with the full unpickler, for files whose origin you trust.
:func:`read_checkpoint` reads one of this framework's checkpoints, its hyper-parameters in today's layout
(:mod:`diffusion.sharing.legacy`: a file written by an earlier layout loads as it was trained).

The formats a model is shared in: an exported folder (``model.safetensors``: tensors only, + ``config.json``: the
hyper-parameters as plain data; :func:`write_safetensors_folder`), and a diffusers ``UNet2DModel`` / ``DDPMPipeline``
folder (:mod:`diffusion.sharing.diffusers_bridge`). ``ckpt=`` of every CLI accepts either (:func:`folder_kind`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.sharing.legacy import upgrade_hyper_parameters

if TYPE_CHECKING:
    import torch

#: globals a checkpoint of this framework may name beyond torch's weights-only defaults (tensors, storages, dtypes,
#: OrderedDict, ...): none; add a class here, never a function, if a checkpoint must hold one
ALLOWED_GLOBALS: list = []

__all__ = ["ALLOWED_GLOBALS", "load_file", "read_checkpoint", "unsafe_globals", "folder_kind", "write_safetensors_folder",
           "read_safetensors_folder", "SAFETENSORS_FORMAT"]


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals (``module.name``) a checkpoint file names that the weights-only unpickler would not load."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: nothing to name
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    return [g for g in found if g not in allowed]


def load_file(path: str | Path, setting: str = "ckpt", map_location: str | torch.device = "cpu", mmap: bool = False,
              trust: bool = False):
    """What ``torch.load`` returns for ``path``, read weights-only unless ``trust``.

    ValueError (one line) naming ``<setting>=<path>``: the file is missing or unreadable (truncated, not a file
    torch.save wrote), or it holds objects outside the allow-list (named; nothing in the file was run)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{setting}={path} does not exist or is not a file")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(path)
        if not trust and (names or "Unsupported global" in str(exc)):
            named = f" (it names {', '.join(names[:4])})" if names else ""
            raise ValueError(f"{setting}={path} holds objects beyond tensors and plain data{named}, which a checkpoint of "
                             "this framework never holds: reading it could run code from the file, so it was not read; if "
                             "you trust where it came from, pass trust_checkpoint=true") from exc
        raise _unreadable(setting, path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise _unreadable(setting, path, exc) from exc


def read_checkpoint(path: str | Path, setting: str = "ckpt", map_location: str | torch.device = "cpu", mmap: bool = False,
                    trust: bool = False) -> dict:
    """A checkpoint this framework wrote, as ``torch.load`` returns it (``mmap``: tensors stay on disk until read),
    read weights-only (:func:`load_file`) unless ``trust`` (``trust_checkpoint=true``).

    Raises ValueError naming ``<setting>=<path>`` when the file is missing, unreadable (truncated, a text file),
    holds objects beyond tensors and plain data (nothing of it is run), or is not one of this framework's checkpoints.
    """
    ckpt = load_file(path, setting, map_location, mmap, trust)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or not {"model", "schedule", "sampler"} <= set(hparams) or "state_dict" not in ckpt:
        raise ValueError(f"{setting}={path} is not a checkpoint of this framework (no model/schedule hyper-parameters): "
                         "pass a .ckpt file written by python -m diffusion.train")
    ckpt["hyper_parameters"] = upgrade_hyper_parameters(hparams)  # an earlier layout's, in today's
    return ckpt


def _unreadable(setting: str, path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{setting}={path} is not a readable checkpoint ({type(exc).__name__}: truncated, or not a file "
                      "torch.save wrote): pass a .ckpt file written by python -m diffusion.train")


# ----------------------------------------------------------------------------------------------- shared formats
#: the exported-folder format: ``model.safetensors`` (the module's state dict: network, EMA weights when the
#: checkpoint had them, and the process's buffers) + ``config.json`` (this, the hyper-parameters as plain data)
SAFETENSORS_FORMAT = "diffusion-safetensors"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def folder_kind(path: str | Path) -> str | None:
    """``safetensors`` (a folder diffusion.export wrote), ``diffusers`` (a UNet2DModel or DDPMPipeline folder), or
    None (not a folder either knows)."""
    import json

    path = Path(path)
    if not path.is_dir():
        return None
    config = path / CONFIG_FILE
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return None
        if data.get("format") == SAFETENSORS_FORMAT:
            return "safetensors"
        if data.get("_class_name") == "UNet2DModel":
            return "diffusers"
    if (path / "model_index.json").is_file() and (path / "unet").is_dir():
        return "diffusers"
    return None


def write_safetensors_folder(module, out: str | Path, source: dict) -> Path:
    """Write ``module`` (its weights as loaded: the EMA ones by default) as ``out/model.safetensors`` plus
    ``out/config.json`` (its hyper-parameters and ``source``: where it came from). The folder is written under a
    temporary name and renamed into place: it is complete or absent. ``out`` must not exist."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": SAFETENSORS_FORMAT})
        config = {"format": SAFETENSORS_FORMAT, "version": 1, "hyper_parameters": dict(module.hparams),
                  "has_ema": bool(module.has_ema), "source": source}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        os.replace(tmp, out)  # a rename: a folder of the same name appearing meanwhile makes it fail, not merge
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_safetensors_folder(path: str | Path, setting: str = "ckpt") -> tuple[dict, dict, bool]:
    """(hyper-parameters, state dict, has_ema) of a folder :func:`write_safetensors_folder` wrote; safetensors holds
    tensors only, so reading it runs nothing. ValueError (one line) for a missing or unreadable file."""
    import json

    from safetensors.torch import load_file as load_safetensors

    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        state = load_safetensors(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting}={path} is not a readable exported model ({type(exc).__name__}: it needs "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE} as python -m diffusion.export writes them)") from exc
    return config["hyper_parameters"], state, bool(config.get("has_ema"))
