"""The shared LightningDataModule: a uint8 image tensor, a seeded train/val split, per-epoch shuffling."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from diffusion.checks import check_positive_int


class UInt8Images(Dataset):
    """Images as one uint8 tensor (N, C, H, W); optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, hflip: bool = False):
        self.images, self.hflip = images, hflip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class EpochSeededSampler(RandomSampler):
    """A random permutation per epoch that depends only on (seed, epoch), so a resumed run sees the same order.

    Lightning calls ``set_epoch`` at every epoch start; under DDP it swaps this sampler for a
    ``DistributedSampler`` (also seeded by epoch) because this is a ``RandomSampler``.
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`load_images` returning uint8 (N, C, H, W) at ``image_size``."""

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        hflip: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.image_size = check_positive_int("image_size", image_size, "data")
        self.batch_size = check_positive_int("batch_size", batch_size, "data")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data val_fraction={val_fraction!r} is invalid: it must lie in [0, 1)")
        self.val_fraction, self.num_workers, self.hflip, self.seed = val_fraction, num_workers, hflip, seed
        self.train_set: UInt8Images | None = None
        self.val_set: UInt8Images | None = None

    channels: int = 3

    def load_images(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images = self.load_images()
        n_val = int(round(len(images) * self.val_fraction))
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        self.train_set = UInt8Images(images[perm[n_val:]], hflip=self.hflip)
        self.val_set = UInt8Images(images[perm[:n_val]])
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data batch_size={self.batch_size} is invalid: only {len(self.train_set)} training images"
            )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(self.train_set, self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
