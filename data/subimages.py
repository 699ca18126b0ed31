"""High-resolution views: split an image into a grid of base-resolution sub-images + a thumbnail.

The data side of a model built with `views` (models/views.py): every component then sees the
views and which crop each is. The grid is chosen from a list of candidates (rows, cols) the way LLaVA-NeXT's
"anyres" does: the candidate canvas that keeps the most of the image's pixels after an
aspect-preserving resize, ties broken by the least padding.
"""

from __future__ import annotations

from PIL import Image

from data.images import expand_to_square


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


def thumbnail_and_crops(
    image: Image.Image, grids: list[tuple[int, int]], base: int, fill: tuple[int, int, int]
) -> tuple[list[Image.Image], tuple[int, int]]:
    """[thumbnail, crop(0,0), crop(0,1), ...] (each base×base, crops in raster order) and the grid."""
    image = image.convert("RGB")
    rows, cols = select_grid(image.width, image.height, grids, base)
    thumbnail = expand_to_square(image, fill).resize((base, base), Image.BICUBIC)
    canvas = fit_to_canvas(image, cols * base, rows * base, fill)
    crops = [
        canvas.crop((c * base, r * base, (c + 1) * base, (r + 1) * base))
        for r in range(rows)
        for c in range(cols)
    ]
    return [thumbnail] + crops, (rows, cols)
