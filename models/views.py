"""Images as several views: a thumbnail of the whole image and a grid of crops, each at the
tower's resolution (LLaVA-NeXT's "anyres"; TokenPacker HD; FALCON's sub-images).

This is a model-level data path, not a projector's feature. The data side
(`data/subimages.py`) turns an image into [thumbnail, crop(0,0), crop(0,1), ...] and a batch
carries `image_grids` (I, 2) = (rows, cols) per image. The model then

1. encodes every view of the batch together, telling the components which image and which crop
   each view is (`ViewLayout`: encoder components get it in `extend_embeddings`, `select` and
   `after_vision_attention`; projectors in `VisionFeatures.views`);
2. lays each image's view tokens out for the LLM (`ViewArranger.arrange`): the thumbnail's
   tokens, then the crops'. When the projector emits a square token map per view (its
   `output_grid`), the crops become one (rows·side) × (cols·side) map in raster order, as
   LLaVA-NeXT does; otherwise they follow crop by crop. With `newline`, a learned token ends each
   line of the map (each row of crops when there is no map), as LLaVA-NeXT's `image_newline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

WHOLE = -1  # row / col of a view that shows the whole image (a single view or the thumbnail)


@dataclass(frozen=True)
class MultiViewConfig:
    """`model.views` of a recipe."""

    grids: tuple[tuple[int, int], ...]  # candidate (rows, cols); each image takes the best fit
    newline: bool = True  # a learned token after each line of crop tokens

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for what is wrong with these settings."""
        if not self.grids:
            return [("grids", "give at least one [rows, cols] grid")]
        if any(len(g) != 2 or min(g) < 1 for g in self.grids):
            return [
                ("grids", f"each grid is [rows, cols] with both ≥ 1, got {[list(g) for g in self.grids]}")
            ]
        return []

    def to_dict(self) -> dict:
        return {"grids": [list(g) for g in self.grids], "newline": self.newline}


@dataclass
class ViewLayout:
    """Where each of the V views of a batch comes from, in the order the tower sees them.

    image: (V,) long, the image (index in the batch's images) the view belongs to
    row:   (V,) long, the crop's row in its image's grid; WHOLE (-1) for a whole image/thumbnail
    col:   (V,) long, the crop's column; WHOLE for a whole image/thumbnail
    grids: (rows, cols) per image, or None when every image is a single view
    """

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    grids: list[tuple[int, int]] | None = None

    @classmethod
    def single(cls, count: int, device=None) -> ViewLayout:
        """One whole-image view per image."""
        whole = torch.full((count,), WHOLE, dtype=torch.long, device=device)
        return cls(torch.arange(count, device=device), whole, whole.clone())

    @classmethod
    def from_grids(cls, image_grids: torch.Tensor, device=None) -> ViewLayout:
        """Thumbnail then rows·cols crops in raster order, per image of `image_grids` (I, 2)."""
        image, row, col = [], [], []
        grids = [(int(r), int(c)) for r, c in image_grids.tolist()]
        for i, (rows, cols) in enumerate(grids):
            image += [i] * (1 + rows * cols)
            row += [WHOLE] + [r for r in range(rows) for _ in range(cols)]
            col += [WHOLE] + [c for _ in range(rows) for c in range(cols)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_tensor(image), as_tensor(row), as_tensor(col), grids)

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def is_crop(self) -> torch.Tensor:
        """(V,) bool: the view is a crop (not a whole image or thumbnail)."""
        return self.row >= 0

    def views_per_image(self) -> list[int]:
        return torch.bincount(self.image).tolist()


class ViewArranger(nn.Module):
    """Lays the tokens of each image's views out as one sequence for the LLM; owns the learned
    newline token (trained with the projector)."""

    def __init__(self, config: MultiViewConfig, llm_width: int):
        super().__init__()
        self.config = config
        self.grids = [tuple(g) for g in config.grids]
        if config.newline:
            self.image_newline = nn.Parameter(torch.randn(llm_width) / llm_width**0.5)

    def tokens(self, grid: tuple[int, int], per_view: int, side: int | None) -> int:
        """Tokens of one image of `grid` = (rows, cols) crops, each view `per_view` tokens (a
        side × side map when `side`)."""
        rows, cols = grid
        lines = rows * side if side else rows  # newline after each line of the crop map
        return per_view * (1 + rows * cols) + lines * self.config.newline

    def arrange(self, tokens: torch.Tensor, layout: ViewLayout, side: int | None) -> list[torch.Tensor]:
        """tokens (V, N, H) of every view in `layout` order → one (tokens(grid), H) per image."""
        out = []
        for views, grid in zip(tokens.split(layout.views_per_image()), layout.grids, strict=True):
            out.append(torch.cat([views[0], self._crops(views[1:], grid, side)]))
        return out

    def _crops(self, crops: torch.Tensor, grid: tuple[int, int], side: int | None) -> torch.Tensor:
        """(rows·cols, N, H) → the crop tokens in reading order, lines ended by the newline."""
        rows, cols = grid
        width = crops.shape[-1]
        if side:  # one (rows·side) × (cols·side) map: line y of the map crosses `cols` crops
            lines = crops.view(rows, cols, side, side, width).permute(0, 2, 1, 3, 4)
            lines = lines.reshape(rows * side, cols * side, width)
        else:  # a line per row of crops
            lines = crops.view(rows, cols * crops.shape[1], width)
        if self.config.newline:
            newline = self.image_newline.to(crops.dtype).expand(lines.shape[0], 1, width)
            lines = torch.cat([lines, newline], dim=1)
        return lines.flatten(0, 1)
