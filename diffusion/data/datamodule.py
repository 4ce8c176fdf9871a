"""The shared LightningDataModule: uint8 images (and, ``conditional``, their class labels), a seeded train/val split,
per-epoch shuffling, start-up report."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from diffusion.data.resumable import ResumableDataLoader
from diffusion.data.settings import check_data

log = logging.getLogger("diffusion.data")


class UInt8Images(Dataset):
    """Rows ``indices`` of a uint8 (N, C, H, W) array (in memory or memory-mapped); optional horizontal flip.

    Item ``i`` is the image, a uint8 (C, H, W) tensor; with ``labels`` (int64 (N,), aligned with ``images``) it is
    ``(image, label)``, the label an int64 0-dim tensor, so that batches are ``(uint8 (B, C, H, W), int64 (B,))``.
    """

    def __init__(self, images: np.ndarray, indices: np.ndarray, hflip: bool = False, labels: np.ndarray | None = None):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images, self.indices, self.hflip, self.labels = images, indices, hflip, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        x = torch.from_numpy(np.array(self.images[j]))
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.labels is None:
            return x
        return x, torch.tensor(int(self.labels[j]), dtype=torch.int64)


class EpochSeededSampler(RandomSampler):
    """A random permutation per epoch that depends only on (seed, epoch), so a resumed run sees the same order.

    Lightning calls ``set_epoch`` at every epoch start; under DDP it puts a ``DistributedSampler`` in its place (in
    the loader's batch sampler): a permutation seeded by the run's ``seed`` and the epoch, of which each rank takes
    every world_size-th index. ``epoch`` is the epoch last set (the resumable loader records it with its place in
    the epoch).
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self.seed + epoch)


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`load_images`, a uint8 (N, C, H, W) array at ``image_size``.

    Batches are uint8 tensors; the LightningModule scales them to [-1, 1] on its device. With ``conditional=True``
    they are ``(images, labels)``, the labels int64 in ``0..num_classes-1`` (:meth:`load_labels`); subclasses set
    ``num_classes`` and ``class_names`` (the name of label k is ``class_names[k]``) in their ``__init__``, so the
    model can be built from them before any image is loaded. Without ``conditional`` both are None.
    """

    #: image channels the network will see (the model's ``in_channels`` follows it)
    channels: int = 3
    #: shown in logs and cache names
    name: str = "images"
    #: whether :meth:`load_labels` gives every image's class (the classifier-feature metric trains on them)
    has_labels: bool = False

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        hflip: bool = False,
        seed: int = 0,
        limit: int | None = None,
        conditional: bool = False,
    ):
        super().__init__()
        check_data(image_size, batch_size, val_fraction, num_workers, hflip, seed, limit, conditional)
        self.image_size, self.batch_size = image_size, batch_size
        self.val_fraction, self.num_workers, self.hflip, self.seed, self.limit = val_fraction, num_workers, hflip, seed, limit
        self.conditional = conditional
        #: classes the labels index (labels are 0..num_classes-1), None unless ``conditional``
        self.num_classes: int | None = None
        #: the name of each label (``class_names[k]`` for label k), None unless ``conditional``
        self.class_names: list[str] | None = None
        self.train_set: UInt8Images | None = None
        self.val_set: UInt8Images | None = None
        self.num_skipped = 0
        self._counts_logged = False

    def load_images(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_labels(self) -> np.ndarray | None:
        """Each image's class (int64, aligned with :meth:`load_images`), or None for a source without classes."""
        return None

    def split_labels(self, split: str) -> np.ndarray:
        """The labels of the ``train`` or ``val`` split's images, in the split's order (after :meth:`setup`)."""
        labels = self.load_labels()
        if labels is None:
            raise ValueError(f"data {self.name} has no class labels")
        return np.asarray(labels)[(self.train_set if split == "train" else self.val_set).indices]

    def num_val(self, num_images: int) -> int:
        return int(round(num_images * self.val_fraction))

    def check_batch_size(self, num_images: int) -> None:
        """Refuse a batch larger than the training split of ``num_images`` images: the training loader drops the
        last incomplete batch, so it would yield no batch at all and Lightning would silently train nothing."""
        n_train = num_images - self.num_val(num_images)
        if self.batch_size > n_train:
            raise ValueError(
                f"data batch_size={self.batch_size} is invalid: the training split holds only {n_train} images "
                f"({num_images} {self.name} images, val_fraction={self.val_fraction}): pass data.batch_size=<at most {n_train}>"
            )

    def setup(self, stage: str | None = None) -> None:
        """Load and split the images (once; diffusion.train calls it before the Trainer exists, to refuse bad data
        before any training), then report the counts to the Trainer's loggers once one is attached."""
        if self.train_set is None:
            images = self.load_images()
            n = len(images)
            self.check_batch_size(n)
            n_val = self.num_val(n)
            labels = self.class_labels(n) if self.conditional else None
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).numpy()
            self.train_set = UInt8Images(images, np.sort(perm[n_val:]), hflip=self.hflip, labels=labels)
            self.val_set = UInt8Images(images, np.sort(perm[:n_val]), labels=labels)
            c, h, w = images.shape[1:]
            skipped = f", {self.num_skipped} unreadable files skipped" if self.num_skipped else ""
            if self.conditional:
                log.info("data %s: %d classes, %s train / %s val images of %dx%dx%d%s; train images per class: %s",
                         self.name, self.num_classes, f"{len(self.train_set):,}", f"{len(self.val_set):,}", c, h, w,
                         skipped, self.class_counts(labels[self.train_set.indices]))
            else:
                log.info("data %s: %d train / %d val images of %dx%dx%d%s", self.name, len(self.train_set), len(self.val_set), c, h, w, skipped)
        trainer = self.trainer  # None outside a Trainer
        if trainer is not None and trainer.is_global_zero and not self._counts_logged:
            self._counts_logged = True
            counts = {"data/train_images": len(self.train_set), "data/val_images": len(self.val_set), "data/skipped_files": self.num_skipped}
            if self.conditional:
                counts["data/num_classes"] = self.num_classes
            for logger in trainer.loggers:
                logger.log_hyperparams(counts)

    def class_labels(self, num_images: int) -> np.ndarray:
        """:meth:`load_labels`, checked: int64, one per image, each in 0..num_classes-1."""
        labels = self.load_labels()
        if labels is None or self.num_classes is None:
            raise ValueError(f"data {self.name} has no class labels: drop data.conditional=true")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (num_images,):
            raise ValueError(f"data {self.name}: {labels.shape[0]} labels for {num_images} images")
        if num_images and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise ValueError(f"data {self.name}: labels in [{labels.min()}, {labels.max()}] outside 0..{self.num_classes - 1}")
        return labels

    def class_counts(self, labels: np.ndarray) -> str:
        """``"0 160, 1 163, ..."`` (every class, up to 20 of them), or the range and the smallest class."""
        counts = np.bincount(labels, minlength=self.num_classes)
        if self.num_classes <= 20:
            return ", ".join(f"{name} {count:,}" for name, count in zip(self.class_names, counts))
        k = int(counts.argmin())
        return f"{counts.min():,} to {counts.max():,} (fewest: {self.class_names[k]})"

    def train_dataloader(self) -> DataLoader:
        # resumable: a checkpoint saved in the middle of an epoch continues at the next batch of the same order
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(self.train_set, self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
