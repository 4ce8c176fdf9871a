"""The embedded default: scikit-learn's bundled 8x8 digits (1,797 images), upsampled, runs anywhere offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.data.datamodule import ImageDataModule


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 or [0, 1] float (N, C, H, W) images to ``size`` x ``size`` uint8."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class DigitsDataModule(ImageDataModule):
    """sklearn ``load_digits`` (0..16 grey levels) resized bilinearly to ``image_size`` as uint8, 1 channel."""

    channels = 1
    name = "digits"
    has_labels = True

    def __init__(self, image_size: int = 32, batch_size: int = 64, val_fraction: float = 0.1, num_workers: int = 0,
                 hflip: bool = False, seed: int = 0, limit: int | None = None, conditional: bool = False):
        super().__init__(image_size, batch_size, val_fraction, num_workers, hflip, seed, limit, conditional)
        if conditional:  # the digit k has label k
            self.num_classes, self.class_names = 10, [str(k) for k in range(10)]

    def load_images(self) -> np.ndarray:
        from sklearn.datasets import load_digits

        images = resize_uint8(torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0, self.image_size)
        return images[: self.limit].numpy()

    def load_labels(self) -> np.ndarray:
        from sklearn.datasets import load_digits

        return load_digits().target[: self.limit].astype(np.int64)
