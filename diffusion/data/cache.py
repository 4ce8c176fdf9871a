"""A preprocessing cache: images decoded and downsampled once into a uint8 array on disk, memory-mapped after.

A cache entry is ``<name>-<key>.npy`` (N, C, H, W uint8) plus ``<name>-<key>.json`` (what it was built from and
how many files were skipped) and, for labelled images, ``<name>-<key>.labels.npy`` (N,) int64 with the class names
in the JSON. Each is written to a temporary name and renamed into place, an old JSON removed first and the new one
written last: an entry without its JSON, or whose JSON disagrees with the array or the labels (shape, checksum), is
never trusted, so a run killed while building leaves nothing a later run would load.
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


def labels_path(cache_dir: str | Path, name: str, spec: dict) -> Path:
    return Path(cache_dir) / f"{name}-{cache_key(spec)}.labels.npy"


def _sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def load(cache_dir: str | Path, name: str, spec: dict) -> tuple[np.ndarray, dict] | None:
    """The cached array (memory-mapped, read-only) and its metadata, or None if there is no complete entry.

    For an entry written with labels, ``meta["labels"]`` is the int64 (N,) array and ``meta["class_names"]`` the
    names of its classes.
    """
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
    if "labels_sha256" in meta:
        try:
            labels = np.load(labels_path(cache_dir, name, spec))
        except (OSError, ValueError):
            return None
        if labels.dtype != np.int64 or labels.shape != (len(array),) or _sha256(labels) != meta["labels_sha256"]:
            return None
        meta["labels"] = labels
    return array, meta


def _save(path: Path, array: np.ndarray) -> None:
    """``array`` under ``path``, through a temporary file renamed into place (removed if the write fails)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(cache_dir: str | Path, name: str, spec: dict, array: np.ndarray, labels: np.ndarray | None = None,
          class_names: list[str] | None = None, **info) -> tuple[Path, dict]:
    """Write an entry atomically (temporary files, then rename; the metadata removed first and written last).

    ``labels``: each image's class (int64, aligned with ``array``), kept with the entry with ``class_names``.
    """
    array_path, meta_path = entry_paths(cache_dir, name, spec)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"spec": json.loads(json.dumps(spec, default=str)), "shape": list(array.shape), **info}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(array),):
            raise ValueError(f"{len(labels)} labels for {len(array)} images")
        meta.update(labels_sha256=_sha256(labels), class_names=class_names)
    meta_path.unlink(missing_ok=True)  # an entry being rewritten is not trusted until its new metadata is in place
    _save(array_path, array)
    if labels is not None:
        _save(labels_path(cache_dir, name, spec), labels)
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    try:
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, meta_path)
    finally:
        tmp_meta.unlink(missing_ok=True)
    return array_path, meta
