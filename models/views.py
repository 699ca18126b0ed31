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
   With `indicators` (FALCON's crop indicators), a few text tokens go before each view, naming
   it: `<global_img>` before the thumbnail, `<crop_img_row{r}_col{c}>` before each crop, as the
   authors' processor writes them. The crops then follow one by one (each crop's tokens after its
   indicator, never interleaved into one map), the newline after each row of crops; the
   indicators are text to every later step (`visual_mask` False, role CONTEXT), so one image
   becomes several visual spans with text between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data.subimages import Fit, Tiling

WHOLE = -1  # row / col of a view that shows the whole image (a single view or the thumbnail)


@dataclass(frozen=True)
class CropIndicators:
    """The text written before each view (`model.views.indicators`); the defaults are FALCON's.
    `crop` is formatted with the crop's `row` and `col` (from 0)."""

    whole: str = "<global_img>"
    crop: str = "<crop_img_row{row}_col{col}>"

    def text(self, row: int, col: int) -> str:
        """The indicator of the view at (row, col); WHOLE, WHOLE for the thumbnail."""
        return self.whole if row == WHOLE else self.crop.format(row=row, col=col)

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if not self.whole.strip():
            problems.append(("indicators.whole", "give a non-empty text"))
        try:
            named = {self.crop.format(row=0, col=0), self.crop.format(row=1, col=0)}
            if len(named | {self.crop.format(row=0, col=1)}) < 3:
                problems.append(("indicators.crop", f"must name both {{row}} and {{col}}, got {self.crop!r}"))
        except (KeyError, IndexError, ValueError) as err:
            problems.append(("indicators.crop", f"a format with only {{row}} and {{col}}: {err!r}"))
        return problems


@dataclass(frozen=True)
class MultiViewConfig:
    """`model.views` of a recipe."""

    grids: tuple[tuple[int, int], ...]  # candidate (rows, cols); each image takes the best fit
    newline: bool = True  # a learned token after each line of crop tokens
    indicators: CropIndicators | None = None  # text naming each view (FALCON's), or none
    # how an image picks its grid and fits it (data/subimages.py): "anyres", LLaVA-NeXT's (most
    # pixels kept, padded), or "shape_match", FALCON's (closest shape then size, stretched)
    fit: Fit = "anyres"

    @property
    def tiling(self) -> Tiling:
        return Tiling(tuple(tuple(g) for g in self.grids), self.fit)

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for what is wrong with these settings."""
        if not self.grids:
            return [("grids", "give at least one [rows, cols] grid")]
        if any(len(g) != 2 or min(g) < 1 for g in self.grids):
            return [
                ("grids", f"each grid is [rows, cols] with both ≥ 1, got {[list(g) for g in self.grids]}")
            ]
        return self.indicators.problems() if self.indicators else []

    def to_dict(self) -> dict:
        out = {"grids": [list(g) for g in self.grids], "newline": self.newline, "fit": self.fit}
        if self.indicators is not None:
            out["indicators"] = {"whole": self.indicators.whole, "crop": self.indicators.crop}
        return out

    @classmethod
    def from_dict(cls, values: dict) -> MultiViewConfig:
        """Inverse of `to_dict` (an export's `views`)."""
        indicators = values.get("indicators")
        return cls(
            tuple(tuple(g) for g in values["grids"]),
            values["newline"],
            CropIndicators(**indicators) if indicators is not None else None,
            values.get("fit", "anyres"),  # exports written before `fit` existed used anyres
        )


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


def view_places(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, col) of each view of an image of `grid` crops, in order: (WHOLE, WHOLE), (0, 0), ..."""
    rows, cols = grid
    return [(WHOLE, WHOLE)] + [(r, c) for r in range(rows) for c in range(cols)]


@dataclass
class ImageTokens:
    """One image's tokens for the LLM when text lies between its views: embeddings (N, H) and
    which of them are visual (N,) bool (False at the crop indicators)."""

    embeds: torch.Tensor
    is_visual: torch.Tensor


class ViewArranger(nn.Module):
    """Lays the tokens of each image's views out as one sequence for the LLM; owns the learned
    newline token (trained with the projector) and the ids of the crop indicators."""

    def __init__(self, config: MultiViewConfig, llm_width: int):
        super().__init__()
        self.config = config
        self.grids = [tuple(g) for g in config.grids]
        if config.newline:
            self.image_newline = nn.Parameter(torch.randn(llm_width) / llm_width**0.5)
        self.indicator_ids: dict[tuple[int, int], list[int]] = {}  # (row, col) → token ids

    def tokenize_indicators(self, tokenizer) -> None:
        """Token ids of every view's indicator this model can meet (`config.grids`). A
        ValueError when the tokenizer does not know a piece of one (a word-level tokenizer would
        make every crop's indicator the same unknown token) or two views get the same ids."""
        indicators = self.config.indicators
        largest = (max(r for r, _ in self.grids), max(c for _, c in self.grids))
        named: dict[tuple[int, ...], str] = {}
        for row, col in view_places(largest):
            text = indicators.text(row, col)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if not ids or tokenizer.unk_token_id in ids:
                raise ValueError(f"the tokenizer does not know every piece of the indicator {text!r}")
            if tuple(ids) in named:
                raise ValueError(f"the indicators {named[tuple(ids)]!r} and {text!r} tokenize the same")
            named[tuple(ids)] = text
            self.indicator_ids[row, col] = ids

    def text_tokens(self, grid: tuple[int, int]) -> int:
        """Indicator (text) tokens one image of `grid` adds to the LLM's input."""
        if self.config.indicators is None:
            return 0
        return sum(len(self._ids(row, col)) for row, col in view_places(grid))

    def _ids(self, row: int, col: int) -> list[int]:
        if (row, col) not in self.indicator_ids:
            raise RuntimeError(f"no indicator ids for view {(row, col)}: call tokenize_indicators first")
        return self.indicator_ids[row, col]

    def tokens(self, grid: tuple[int, int], per_view: int, side: int | None) -> int:
        """Visual tokens of one image of `grid` = (rows, cols) crops, each view `per_view` tokens
        (a side × side map when `side`); the indicators are text, counted by `text_tokens`."""
        rows, cols = grid
        lines = rows * side if side and self.config.indicators is None else rows
        return per_view * (1 + rows * cols) + lines * self.config.newline

    def arrange(
        self, tokens: torch.Tensor, layout: ViewLayout, side: int | None, embed=None
    ) -> list[torch.Tensor] | list[ImageTokens]:
        """tokens (V, N, H) of every view in `layout` order → one (tokens(grid), H) per image;
        with indicators, one `ImageTokens` per image, `embed` turning their ids (n,) into (n, H)."""
        per_image = zip(tokens.split(layout.views_per_image()), layout.grids, strict=True)
        if self.config.indicators is not None:
            return [self._with_indicators(views, grid, embed) for views, grid in per_image]
        return [torch.cat([views[0], self._crops(views[1:], grid, side)]) for views, grid in per_image]

    def _with_indicators(self, views: torch.Tensor, grid: tuple[int, int], embed) -> ImageTokens:
        """(1 + rows·cols, N, H) views → indicator, thumbnail, then per crop its indicator and
        its tokens; the newline after each row of crops."""
        cols = grid[1]
        pieces, visual = [], []

        def add(x: torch.Tensor, is_visual: bool) -> None:
            pieces.append(x.to(views.dtype))
            visual.append(torch.full((x.shape[0],), is_visual, dtype=torch.bool, device=views.device))

        def indicator(row: int, col: int) -> torch.Tensor:
            return embed(torch.tensor(self._ids(row, col), device=views.device))

        for view, (row, col) in zip(views, view_places(grid), strict=True):
            add(indicator(row, col), False)
            add(view, True)
            if self.config.newline and row != WHOLE and col == cols - 1:  # a row of crops ends
                add(self.image_newline[None], True)
        return ImageTokens(torch.cat(pieces), torch.cat(visual))

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
