r"""Any folder of images (FFHQ, Kaggle's dog-vs-cat, Simpsons, StanfordCars, flowers ...), downsampled and cached.

    python -m diffusion.train data=folder data.root=/path/to/images data.image_size=64
    python -m diffusion.train data=dog data.root=/path/to/dogs-vs-cats/train        # include: ["dog.*"]

Files are found recursively by extension and sorted; ``include``/``exclude`` are glob patterns matched against
each file's path relative to ``root`` and against its name (``"dog.*"``, ``"dogs/*"``); ``limit`` keeps the first
N. The first run decodes every image once (resize of the shorter side + centre crop, antialiased) into the cache
(:mod:`diffusion.data.cache`); later runs, and every DDP rank, memory-map it. Unreadable files are skipped and
counted.

``conditional=true`` gives every image a class (batches are ``(images, labels)``): by default the first-level
subfolder of ``root`` it lies in (``root/<class>/.../x.jpg``), or, with ``class_from``, a regular expression searched
in the file name: its first group (the whole match if it has no group) is the class, e.g. ``'^(cat|dog)\.'`` for
Kaggle's dogs-vs-cats ``cat.123.jpg``. The sorted class names are labels 0..K-1. The labels are cached with the
images (aligned after unreadable files are skipped) and the class names in the cache's metadata.

    python -m diffusion.train data=cars data.root=/path/to/car_data/train data.conditional=true
    python -m diffusion.train data=folder data.root=/path/to/dogs-vs-cats/train data.conditional=true "data.class_from='^(cat|dog)\.'"
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion.data import cache
from diffusion.data.datamodule import ImageDataModule

log = logging.getLogger("diffusion.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def decode_image(path: str, size: int, channels: int) -> np.ndarray | None:
    """One image as uint8 (C, size, size): shorter side resized to ``size`` and centre-cropped; None if unreadable."""
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            im.draft(mode, (2 * size, 2 * size))  # JPEG: decode at a reduced scale (still >= 2x the target)
            im = ImageOps.exif_transpose(im).convert(mode)
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)  # antialiased resize + centre crop
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_star(args):
    return decode_image(*args)


def _matches(rel: str, patterns) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


class ImageFolderDataModule(ImageDataModule):
    """Images under ``root`` (recursively), RGB (``channels=3``) or grey (``channels=1``)."""

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        limit: int | None = None,
        cache_dir: str = "data_cache",
        decode_workers: int | None = None,
        name: str = "folder",
        batch_size: int = 64,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        hflip: bool = False,
        seed: int = 0,
        conditional: bool = False,
        class_from: str | None = None,
    ):
        super().__init__(image_size, batch_size, val_fraction, num_workers, hflip, seed, limit, conditional)
        if channels not in (1, 3):
            raise ValueError(f"data channels={channels!r} is invalid: allowed values are 1 (grey), 3 (RGB)")
        self.channels, self.name, self.cache_dir = channels, name, cache_dir
        self.include, self.exclude = list(include or []), list(exclude or [])
        self.decode_workers = decode_workers
        self.class_from = class_from
        self.root = Path(os.path.expanduser(str(root))).resolve()
        pattern = self._class_pattern()
        self.files = self._list_files()
        #: each file's label (int64, aligned with ``files``; None unless conditional); after skipping unreadable
        #: files the labels come from the cache (:meth:`load_labels`)
        self.file_labels: np.ndarray | None = None
        if conditional:
            self.class_names, self.file_labels = self._classes(pattern)
            self.num_classes = len(self.class_names)
            # what the labels depend on (part of the cache key): how classes are found, their names, each file's label
            self._classes_spec = {
                "by": "subfolder" if class_from is None else "class_from",
                "class_from": class_from,
                "names": list(self.class_names),
                "labels_sha256": hashlib.sha256(self.file_labels.tobytes()).hexdigest(),
            }
        self._labels: np.ndarray | None = None
        self.check_batch_size(len(self.files))  # at most this many readable images: refuse before decoding any

    def _class_pattern(self) -> re.Pattern | None:
        if self.class_from is None:
            return None
        if not self.conditional:
            raise ValueError(f"data class_from='{self.class_from}' is only used with data.conditional=true: "
                             "pass data.conditional=true, or drop class_from")
        if not isinstance(self.class_from, str) or not self.class_from:
            raise ValueError(f"data class_from={self.class_from!r} is invalid: it must be a regular expression on the "
                             "file name, e.g. '^(cat|dog)\\.'")
        try:
            return re.compile(self.class_from)
        except re.error as err:
            raise ValueError(f"data class_from='{self.class_from}' is not a valid regular expression ({err}): pass a "
                             "Python regex on the file name whose first group is the class, e.g. '^(cat|dog)\\.'") from None

    def _classes(self, pattern: re.Pattern | None) -> tuple[list[str], np.ndarray]:
        """The sorted class names and each file's label: its first-level subfolder, or ``pattern``'s class."""
        if pattern is None:
            how = "one class per subfolder of root"
            flat = [f for f in self.files if "/" not in f]
            if flat:
                raise ValueError(
                    f"data conditional=true takes one class per subfolder of root={self.root}, and {len(flat)} of its "
                    f"{len(self.files)} images lie directly in it (e.g. {flat[0]}): put each class in its own subfolder, "
                    "or pass data.class_from=<regex on the file name>"
                )
            classes = [f.split("/", 1)[0] for f in self.files]
        else:
            how = f"class_from='{self.class_from}'"
            classes, unmatched = [], []
            for f in self.files:
                m = pattern.search(f.rsplit("/", 1)[-1])
                c = None if m is None else (m.group(1) if pattern.groups else m.group(0))
                if c:  # no match, a group that did not take part, or an empty class are no class
                    classes.append(c)
                else:
                    unmatched.append(f)
            if unmatched:
                raise ValueError(
                    f"data class_from='{self.class_from}' gives no class for {len(unmatched)} of the {len(self.files)} "
                    f"images under root={self.root} (e.g. {unmatched[0]}): it must match every file name (its first "
                    "group, or the whole match, is the class); leave the others out with data.exclude=[...]"
                )
        names = sorted(set(classes))
        if len(names) < 2:
            kept = f" (the first limit={self.limit})" if self.limit is not None else ""
            raise ValueError(
                f"data conditional=true needs at least 2 classes, and the {len(self.files)} images{kept} under "
                f"root={self.root} are all of class {names[0]!r} ({how}): use data with several classes, or "
                "data.conditional=false"
            )
        index = {c: k for k, c in enumerate(names)}
        return names, np.array([index[c] for c in classes], dtype=np.int64)

    def _list_files(self) -> list[str]:
        if not self.root.is_dir():
            raise ValueError(f"data root={self.root} does not exist or is not a directory")
        files = sorted(
            str(p.relative_to(self.root).as_posix())
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ValueError(f"data root={self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        kept = [f for f in files if (not self.include or _matches(f, self.include)) and not _matches(f, self.exclude)]
        if not kept:
            raise ValueError(
                f"data include={self.include} exclude={self.exclude} match none of the {len(files)} images under "
                f"root={self.root}"
            )
        return kept[: self.limit]

    @property
    def cache_spec(self) -> dict:
        """What the cached array depends on; any change makes a new cache entry."""
        return {
            "source": "folder",
            "root": str(self.root),
            "num_files": len(self.files),
            "first": self.files[0],
            "last": self.files[-1],
            "image_size": self.image_size,
            "channels": self.channels,
            "include": self.include,
            "exclude": self.exclude,
            "limit": self.limit,
            **({"classes": self._classes_spec} if self.conditional else {}),
        }

    def prepare_data(self) -> None:
        """Build the cache if there is none (Lightning calls this on rank 0 only)."""
        if cache.load(self.cache_dir, self.name, self.cache_spec) is None:
            self.build_cache()

    def build_cache(self) -> None:
        jobs = [(str(self.root / f), self.image_size, self.channels) for f in self.files]
        workers = self.decode_workers if self.decode_workers is not None else min(8, os.cpu_count() or 1)
        out = np.empty((len(jobs), self.channels, self.image_size, self.image_size), dtype=np.uint8)
        ok = np.zeros(len(jobs), dtype=bool)
        desc = f"caching {len(jobs)} images of {self.root.name} at {self.image_size}px"
        if workers > 1 and len(jobs) > 64:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_decode_star, jobs, chunksize=64)
                for i, arr in enumerate(tqdm(results, total=len(jobs), desc=desc)):
                    if arr is not None:
                        out[i], ok[i] = arr, True
        else:
            for i, job in enumerate(tqdm(jobs, desc=desc)):
                arr = decode_image(*job)
                if arr is not None:
                    out[i], ok[i] = arr, True
        skipped = [f for f, good in zip(self.files, ok) if not good]
        if not ok.any():
            raise ValueError(f"data root={self.root} is invalid: none of its {len(jobs)} image files could be read "
                             f"(e.g. {skipped[0]}): point data.root at a folder of images PIL can open")
        if skipped:
            warnings.warn(f"{len(skipped)} of {len(jobs)} image files could not be read and were skipped (e.g. {skipped[0]})", stacklevel=2)
        labels = {} if self.file_labels is None else {"labels": self.file_labels[ok], "class_names": self._classes_spec["names"]}
        path, _ = cache.write(self.cache_dir, self.name, self.cache_spec, out[ok], skipped=len(skipped),
                              skipped_examples=skipped[:20], **labels)
        log.info("data %s: cached %d images in %s", self.name, int(ok.sum()), path)

    def load_images(self) -> np.ndarray:
        entry = cache.load(self.cache_dir, self.name, self.cache_spec)
        if entry is None:  # setup() without prepare_data(), e.g. outside a Trainer
            self.build_cache()
            entry = cache.load(self.cache_dir, self.name, self.cache_spec)
        images, meta = entry
        self.num_skipped = int(meta.get("skipped", 0))
        if self.conditional:  # the labels of the images kept, and their names, as cached
            self._labels, self.class_names = meta["labels"], list(meta["class_names"])
        return images

    def load_labels(self) -> np.ndarray | None:
        """The cached images' labels (None unless conditional)."""
        if not self.conditional:
            return None
        if self._labels is None:
            self.load_images()
        return self._labels
