"""A preprocessing cache: images decoded and downsampled once into a uint8 array on disk, memory-mapped after.

A cache entry is ``<name>-<key>.npy`` (N, C, H, W uint8) plus ``<name>-<key>.json`` (what it was built from and
how many files were skipped). Both are written to temporary names and renamed into place, the JSON last: an
entry without its JSON, or whose JSON disagrees with the array, is never trusted, so a run killed while
building leaves nothing a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def cache_key(spec: dict) -> str:
    """A short stable hash of everything that determines the cached array (source, size, limit, filters...)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def entry_paths(cache_dir: str | Path, name: str, spec: dict) -> tuple[Path, Path]:
    stem = f"{name}-{cache_key(spec)}"
    return Path(cache_dir) / f"{stem}.npy", Path(cache_dir) / f"{stem}.json"


def load(cache_dir: str | Path, name: str, spec: dict) -> tuple[np.ndarray, dict] | None:
    """The cached array (memory-mapped, read-only) and its metadata, or None if there is no complete entry."""
    array_path, meta_path = entry_paths(cache_dir, name, spec)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("spec") != json.loads(json.dumps(spec, default=str)) or list(array.shape) != meta.get("shape"):
        return None
    return array, meta


def write(cache_dir: str | Path, name: str, spec: dict, array: np.ndarray, **info) -> tuple[Path, dict]:
    """Write an entry atomically (temporary files, then rename; the metadata last)."""
    array_path, meta_path = entry_paths(cache_dir, name, spec)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"spec": json.loads(json.dumps(spec, default=str)), "shape": list(array.shape), **info}
    tmp_array = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_array, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_array, array_path)
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, meta_path)
    finally:
        for tmp in (tmp_array, tmp_meta):
            tmp.unlink(missing_ok=True)
    return array_path, meta
