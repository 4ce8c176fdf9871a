"""The one way a checkpoint file is read: ``torch.load(weights_only=True)`` with an explicit allow-list.

A checkpoint is a pickle, and unpickling runs whatever callables the file names: opening a ``.ckpt`` someone sent
with ``weights_only=False`` runs their code. This framework's checkpoints hold only tensors and plain data (its
hyper-parameters are plain dicts, lists, strings and numbers; Lightning's loop, callback and optimizer states the
same), which torch's weights-only unpickler reads without running anything. :data:`ALLOWED_GLOBALS` lists the
classes beyond those that a checkpoint may hold (none today); a file that names any other global is refused in one
line naming it, before any of it is built. ``trust_checkpoint=true`` (every CLI that reads a checkpoint) is the
explicit way to open an old or foreign file with the full unpickler, for files whose origin you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

#: globals a checkpoint of this framework may name beyond torch's weights-only defaults (tensors, storages, dtypes,
#: OrderedDict, ...): none; add a class here, never a function, if a checkpoint must hold one
ALLOWED_GLOBALS: list = []

__all__ = ["ALLOWED_GLOBALS", "load_file", "unsafe_globals"]


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals (``module.name``) a checkpoint file names that the weights-only unpickler would not load."""
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


def _unreadable(setting: str, path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{setting}={path} is not a readable checkpoint ({type(exc).__name__}: truncated, or not a file "
                      "torch.save wrote): pass a .ckpt file written by python -m diffusion.train")
