"""The embedded default: scikit-learn's bundled 8x8 digits (1,797 images), upsampled, runs anywhere offline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.data.datamodule import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """sklearn ``load_digits`` (0..16 grey levels) resized bilinearly to ``image_size`` as uint8, 1 channel."""

    channels = 1

    def load_images(self) -> torch.Tensor:
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)
