"""Image grids as people look at them: uint8 pixels, small images enlarged, and labelled figures.

One place for every grid the package writes or shows (training sample grids and their W&B images, ``grid.png`` of
``diffusion.sample``, the figures, the sampling page):

- :func:`grid_array` tiles images with white padding (torchvision's ``make_grid`` on uint8 pixels) and enlarges
  the whole grid by an integer nearest-neighbour factor, so that every image is at least :data:`MIN_CELL` pixels
  wide: 16 px digits are shown at 64 px, each pixel a 4 x 4 block, never blurred or resampled;
- :func:`labelled_figure` puts such a grid, pixel for pixel, into a matplotlib figure with a title, a label over
  each column and one left of each row; :func:`save_new` writes an image or figure to a file that must not exist.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: the smallest side, in pixels, an image is shown at (before that, it is enlarged by an integer factor)
MIN_CELL = 64
#: pixels between images in the grid (before enlarging), white
PADDING = 2
PAD_VALUE = 255
DPI = 100
TITLE_PT, LABEL_PT = 11, 9
MARGIN = 8  # px around the figure's parts


def readable_scale(side: int, min_cell: int = MIN_CELL) -> int:
    """The integer nearest-neighbour factor that shows a ``side``-pixel image at >= ``min_cell`` px (1 if it is)."""
    return max(1, -(-min_cell // int(side)))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    import torch

    """float [-1, 1] -> uint8 [0, 255] (uint8 input is returned as is)."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True)
class GridLayout:
    """Where image (row, column) lies in a grid of :func:`grid_array`: ``rows`` x ``cols`` images of ``side`` px
    (enlarged), the first at (``margin``, ``margin``), one every ``pitch`` px."""

    rows: int
    cols: int
    side: int
    margin: int
    pitch: int

    @classmethod
    def of(cls, n: int, side: int, nrow: int, padding: int = PADDING, scale: int = 1) -> "GridLayout":
        cols = min(nrow, n)
        return cls(-(-n // cols), cols, side * scale, padding * scale, (side + padding) * scale)

    @property
    def width(self) -> int:
        return self.cols * self.pitch + self.margin

    @property
    def height(self) -> int:
        return self.rows * self.pitch + self.margin

    def centre(self, index: int) -> float:
        """The pixel coordinate of the centre of column (or row) ``index``."""
        return self.margin + index * self.pitch + self.side / 2


def grid_array(images: torch.Tensor, nrow: int, padding: int = PADDING, scale: int | None = None) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] (or uint8) -> one uint8 grid, ``nrow`` images per row, white padding,
    enlarged by the integer factor ``scale`` (nearest neighbour; default :func:`readable_scale` of the image side).
    (H', W') for one channel, (H', W', C) otherwise."""
    from torchvision.utils import make_grid

    images = to_uint8(images.detach().cpu())
    scale = readable_scale(max(images.shape[-2:])) if scale is None else int(scale)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=PAD_VALUE)  # 1 channel is repeated to 3
    grid = (grid[:1] if images.shape[1] == 1 else grid).permute(1, 2, 0).numpy()
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid[:, :, 0] if grid.shape[2] == 1 else np.ascontiguousarray(grid)


def grid_image(images: torch.Tensor, nrow: int, padding: int = PADDING, scale: int | None = None):
    """:func:`grid_array` as a PIL image (mode ``L`` for one channel, ``RGB`` for three)."""
    from PIL import Image

    return Image.fromarray(grid_array(images, nrow, padding, scale))


def _text_size(text: str, points: float) -> tuple[float, float]:
    """(width, height) in pixels of ``text`` at ``points`` rendered at :data:`DPI`."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(1, 1, DPI)
    sizes = [renderer.get_text_width_height_descent(line or " ", FontProperties(size=points), ismath=False)
             for line in text.split("\n")]
    return max(w for w, _, _ in sizes), sum(h for _, h, _ in sizes) * 1.3


def labelled_figure(grid: np.ndarray, layout: GridLayout, title: str, column_labels: list[str] | None = None,
                    row_labels: list[str] | None = None):
    """A matplotlib figure holding ``grid`` unresampled (``figimage``), ``title`` above it, ``column_labels[c]``
    centred over column c and ``row_labels[r]`` right-aligned left of row r. Its size in pixels (at :data:`DPI`)
    fits the grid and the texts; the grid's top-left pixel is at ``figure.grid_origin`` (x, y from the top-left).
    :func:`save_new` writes the title, the labels and the grid's box into the PNG's text chunks."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if column_labels is not None and len(column_labels) != layout.cols:
        raise ValueError(f"{len(column_labels)} column labels for {layout.cols} columns")
    if row_labels is not None and len(row_labels) != layout.rows:
        raise ValueError(f"{len(row_labels)} row labels for {layout.rows} rows")
    gh, gw = grid.shape[:2]
    title_w, title_h = _text_size(title, TITLE_PT)
    col_h = max((_text_size(s, LABEL_PT)[1] for s in column_labels), default=0) if column_labels else 0
    row_w = max((_text_size(s, LABEL_PT)[0] for s in row_labels), default=0) if row_labels else 0
    left = MARGIN + (int(np.ceil(row_w)) + MARGIN if row_labels else 0)
    top = MARGIN + int(np.ceil(title_h)) + MARGIN + (int(np.ceil(col_h)) + MARGIN // 2 if column_labels else 0)
    width = max(left + gw + MARGIN, int(np.ceil(title_w)) + 2 * MARGIN)
    height = top + gh + MARGIN
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    rgb = np.repeat(grid[:, :, None], 3, axis=2) if grid.ndim == 2 else grid[:, :, :3]
    fig.figimage(rgb, xo=left, yo=MARGIN, origin="upper", resize=False)  # pixel for pixel, no interpolation
    fig.text(0.5, 1 - MARGIN / height, title, ha="center", va="top", fontsize=TITLE_PT)
    for c, label in enumerate(column_labels or []):
        fig.text((left + layout.centre(c)) / width, (MARGIN + gh + MARGIN // 2) / height, label, ha="center",
                 va="bottom", fontsize=LABEL_PT)
    for r, label in enumerate(row_labels or []):
        fig.text((left - MARGIN) / width, (MARGIN + gh - layout.centre(r)) / height, label, ha="right", va="center",
                 fontsize=LABEL_PT)
    fig.grid_origin = (left, top)
    fig.labels = {"Title": title, "Columns": " | ".join(column_labels or []), "Rows": " | ".join(row_labels or []),
                  "Grid": f"{left} {top} {gw} {gh}"}  # where the images are: x, y (from the top left), width, height
    return fig


def save_new(image, path: Path) -> Path:
    """Write a PIL image or a :func:`labelled_figure` (PNG, with its title and labels as text chunks) to ``path``,
    which must not exist (``FileExistsError`` otherwise: nothing is ever written over)."""
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", dpi=DPI, metadata={"Software": "diffusion", **getattr(image, "labels", {})})
    else:
        image.save(buf, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:  # exclusive: fails if the file appeared since it was checked
        f.write(buf.getvalue())
    return path


def figure_image(figure):
    """A :func:`labelled_figure` rendered as a PIL RGB image, pixel for pixel (its texts go in ``image.info``)."""
    from PIL import Image

    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=DPI, metadata={"Software": "diffusion", **getattr(figure, "labels", {})})
    image = Image.open(io.BytesIO(buf.getvalue()))
    image.load()
    return image


def save_png(image, path, settings: dict | None = None) -> None:
    """Save a PIL image as PNG with its text chunks (a :func:`figure_image`'s title, row labels and grid box) and
    ``settings`` (what made it: read back with ``PIL.Image.open(path).text``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    own = getattr(image, "text", None) or {k: v for k, v in image.info.items() if isinstance(v, str)}  # after convert()
    for key, value in {**own, **(settings or {})}.items():
        info.add_text(str(key), str(value))
    image.save(path, format="png", pnginfo=info)


def plural(n: int, word: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def labelled_grid_image(images: torch.Tensor, nrow: int, title: str, column_labels: list[str] | None = None,
                        row_labels: list[str] | None = None):
    """A grid of ``nrow`` images per row as a PIL image, enlarged to a readable size, under ``title``, with a label
    over each column and left of each row (:func:`labelled_figure`; the texts are in ``image.info``)."""
    scale = readable_scale(max(images.shape[-2:]))
    grid = grid_array(images, nrow=nrow, scale=scale)
    layout = GridLayout.of(len(images), max(images.shape[-2:]), nrow, scale=scale)
    return figure_image(labelled_figure(grid, layout, title, column_labels, row_labels))


def class_rows_image(images: torch.Tensor, per_class: int, class_labels: list[str], title: str):
    """A class-conditional grid as a PIL image: row r holds ``per_class`` images of class ``class_labels[r]``, named
    left of the row, under ``title``."""
    return labelled_grid_image(images, per_class, title, row_labels=class_labels)
