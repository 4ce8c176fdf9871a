"""The data modules' shared settings, checked without torch: :class:`diffusion.data.datamodule.ImageDataModule`
calls :func:`check_data` (the one copy of its rules), and ``diffusion.train`` calls it on ``data.*`` before it
imports torch, so that ``data.batch_size=0`` is refused in one line at once."""

from __future__ import annotations

from diffusion.checks import check_positive_int


def check_data(image_size: int = 32, batch_size: int = 64, val_fraction: float = 0.1, num_workers: int = 0,
               hflip: bool = False, seed: int = 0, limit: int | None = None, conditional: bool = False) -> None:
    """:class:`~diffusion.data.datamodule.ImageDataModule`'s arguments (every data module's), or a one-line
    ValueError naming the bad one."""
    if not isinstance(conditional, bool):
        raise ValueError(f"data conditional={conditional!r} is invalid: allowed values are true, false")
    check_positive_int("image_size", image_size, "data")
    check_positive_int("batch_size", batch_size, "data")
    if limit is not None:
        check_positive_int("limit", limit, "data")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"data val_fraction={val_fraction!r} is invalid: it must lie in [0, 1)")
