"""MNIST and FashionMNIST through torchvision's own loaders (IDX files under ``<root>/<MNIST|FashionMNIST>/raw``).

    python -m diffusion.train data=mnist data.root=~/data                   # files already there
    python -m diffusion.train data=mnist data.root=~/data data.download=true # where you have internet
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffusion.data.datamodule import ImageDataModule
from diffusion.data.digits import resize_uint8

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
#: the class names of each dataset, by label (torchvision's FashionMNIST.classes; MNIST's digits by their value)
CLASS_NAMES = {
    "mnist": [str(k) for k in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class TorchvisionDataModule(ImageDataModule):
    """The training split of a torchvision grey-scale dataset, optionally only some ``classes``, resized.

    ``conditional``: batches carry the dataset's own labels; with ``classes`` the labels keep their values (class 3
    is still 3) and ``num_classes`` is still 10.
    """

    channels = 1
    has_labels = True

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        download: bool = False,
        classes: list[int] | None = None,
        image_size: int = 28,
        limit: int | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        hflip: bool = False,
        seed: int = 0,
        conditional: bool = False,
    ):
        super().__init__(image_size, batch_size, val_fraction, num_workers, hflip, seed, limit, conditional)
        if dataset not in DATASETS:
            raise ValueError(f"data dataset={dataset!r} is invalid: allowed values are {', '.join(DATASETS)}")
        self.dataset, self.name, self.download = dataset, dataset, download
        if conditional:
            self.class_names = list(CLASS_NAMES[dataset])
            self.num_classes = len(self.class_names)
        self.root = Path(os.path.expanduser(str(root))).resolve()
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and (not self.classes or any(not 0 <= c <= 9 for c in self.classes)):
            raise ValueError(f"data classes={classes!r} is invalid: it must list labels in 0..9")
        raw = self.root / DATASETS[dataset] / "raw"
        missing = [f for f in RAW_FILES if not (raw / f).is_file()]
        if missing and not download:
            raise ValueError(
                f"data root={self.root} has no {DATASETS[dataset]} files ({raw / missing[0]} is missing): "
                "pass data.download=true where you have internet, or point data.root at the folder holding them"
            )

    def _torchvision(self, download: bool):
        import torchvision

        return getattr(torchvision.datasets, DATASETS[self.dataset])(str(self.root), train=True, download=download)

    def prepare_data(self) -> None:
        if self.download:
            self._torchvision(download=True)  # rank 0 only

    def _kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``classes`` (all by default), the first ``limit`` of them."""
        ds = self._torchvision(download=False)
        images, labels = ds.data, torch.as_tensor(ds.targets)
        if self.classes is not None:
            keep = torch.isin(labels, torch.tensor(self.classes))
            images, labels = images[keep], labels[keep]
            if len(images) == 0:
                raise ValueError(f"data classes={self.classes} match no image of {DATASETS[self.dataset]}")
        return images[: self.limit], labels[: self.limit]

    def load_images(self) -> np.ndarray:
        return resize_uint8(self._kept()[0][:, None], self.image_size).numpy()

    def load_labels(self) -> np.ndarray:
        return self._kept()[1].numpy().astype(np.int64)
