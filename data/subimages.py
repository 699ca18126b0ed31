"""High-resolution views: split an image into a grid of base-resolution sub-images + a thumbnail.

The data side of a model built with `views` (models/views.py): every component then sees the
views and which crop each is. The grid comes from a list of candidates (rows, cols), by one of two
rules (`model.views.fit`):

- `anyres` (LLaVA-NeXT's): the candidate canvas that keeps the most of the image's pixels after an
  aspect-preserving resize, ties broken by the least padding; the image is resized into it and
  padded, the thumbnail padded to a square first.
- `shape_match` (FALCON's, from mPLUG-DocOwl 1.5): the candidate whose shape is closest to the
  image's, then whose size is; the image is stretched to that canvas and to the thumbnail, with
  no padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
from PIL import Image

from data.images import expand_to_square

Fit = Literal["anyres", "shape_match"]


def select_grid(width: int, height: int, grids: list[tuple[int, int]], base: int) -> tuple[int, int]:
    """The (rows, cols) of `grids` whose canvas (cols·base × rows·base) fits `width`×`height` best."""
    if not grids:
        raise ValueError("select_grid needs at least one candidate grid")
    best, best_key = None, None
    for rows, cols in grids:
        canvas_w, canvas_h = cols * base, rows * base
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def corner_iou(w1: int, h1: int, w2: int, h2: int) -> np.float32:
    """IoU of two boxes of whole pixels that share their top-left corner, in float32 with 1e-5
    added to the union, as FALCON's processor computes it (torchvision's box areas)."""
    inter = min(w1, w2) * min(h1, h2)
    return np.float32(inter) / (np.float32(w1 * h1 + w2 * h2 - inter) + np.float32(1e-5))


def select_grid_by_shape(width: int, height: int, grids: list[tuple[int, int]], base: int) -> tuple[int, int]:
    """The (rows, cols) of `grids` whose canvas (cols·base × rows·base) matches the image's shape
    best (IoU with a box of the canvas's width and the image's aspect), then its size (IoU with
    the image's own box); the shape term weighs 100 times the size term, and the first of equals
    wins. As in FALCON's code, the aspect box's height is cut to whole pixels (it is written
    into an integer tensor) and the scores are float32: near ties fall as they do there (a
    square image of 517 × 510 px takes 2 × 2 crops of 384 px, not one)."""
    if not grids:
        raise ValueError("select_grid_by_shape needs at least one candidate grid")

    def score(grid: tuple[int, int]) -> np.float32:
        canvas_w, canvas_h = grid[1] * base, grid[0] * base
        aspect_h = int(np.float32(height / width) * np.float32(canvas_w))
        shape = corner_iou(canvas_w, canvas_h, canvas_w, aspect_h)
        return shape * np.float32(100) + corner_iou(canvas_w, canvas_h, width, height)

    return tuple(max(grids, key=score))


def fit_to_canvas(
    image: Image.Image, canvas_w: int, canvas_h: int, fill: tuple[int, int, int]
) -> Image.Image:
    """Resize keeping the aspect ratio to fit the canvas, centre it, pad with `fill`."""
    scale = min(canvas_w / image.width, canvas_h / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, Image.BICUBIC)
    canvas = Image.new("RGB", (canvas_w, canvas_h), fill)
    canvas.paste(resized, ((canvas_w - size[0]) // 2, (canvas_h - size[1]) // 2))
    return canvas


@dataclass(frozen=True)
class Tiling:
    """How images become views: the candidate grids and the rule that picks one and fits the
    image to it (`model.views.grids` and `model.views.fit`)."""

    grids: tuple[tuple[int, int], ...]
    fit: Fit = "anyres"
    crops: bool = True  # False: each image is one view, its thumbnail (a `views: false` stage)

    def __post_init__(self):
        if self.fit not in get_args(Fit):
            raise ValueError(f"fit must be one of {', '.join(get_args(Fit))}, got {self.fit!r}")

    def whole_images(self) -> Tiling:
        """The same fit without crops: what a stage trained on whole images sees."""
        return replace(self, crops=False)


def thumbnail(image: Image.Image, fit: Fit, base: int, fill: tuple[int, int, int]) -> Image.Image:
    """The whole image at base×base: padded to a square first (anyres) or stretched (shape_match)."""
    if fit == "anyres":
        image = expand_to_square(image, fill)
    return image.resize((base, base), Image.BICUBIC)


def thumbnail_and_crops(
    image: Image.Image, tiling: Tiling, base: int, fill: tuple[int, int, int]
) -> tuple[list[Image.Image], tuple[int, int]]:
    """[thumbnail, crop(0,0), crop(0,1), ...] (each base×base, crops in raster order) and the grid."""
    image = image.convert("RGB")
    grids = list(tiling.grids)
    if tiling.fit == "shape_match":
        rows, cols = select_grid_by_shape(image.width, image.height, grids, base)
        canvas = image.resize((cols * base, rows * base), Image.BICUBIC)
    else:
        rows, cols = select_grid(image.width, image.height, grids, base)
        canvas = fit_to_canvas(image, cols * base, rows * base, fill)
    crops = [
        canvas.crop((c * base, r * base, (c + 1) * base, (r + 1) * base))
        for r in range(rows)
        for c in range(cols)
    ]
    return [thumbnail(image, tiling.fit, base, fill)] + crops, (rows, cols)
