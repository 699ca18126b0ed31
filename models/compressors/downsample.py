"""Image down-sampling (training-free baseline): the image enters the vision tower at a lower
resolution, so the tower itself emits fewer patches, and costs less: S → S·g'/g pixels per side,
g² → g'² visual tokens. A strong baseline that token-compression papers often leave out; the
tower's position embeddings are interpolated to the smaller grid (as HF's
`interpolate_pos_encoding`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.compressors import register
from models.compressors.base import Compressor, ModelDims


@dataclass(frozen=True)
class DownsampleConfig:
    side: int = 0  # patches per side after down-sampling (0: half the base grid, rounded down)


@register("downsample")
class Downsample(Compressor):
    """Resizes every view (bilinear, anti-aliased) to `side` patches per side before the tower."""

    stage = "pixels"
    Config = DownsampleConfig
    baseline = "downsample"

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        side = math.isqrt(budget)
        fits = side * side == budget and 1 <= side <= dims.grid and visual == dims.grid**2
        return {"side": side} if fits else None

    @classmethod
    def check_config(cls, config: DownsampleConfig, dims: ModelDims):
        if not 0 <= config.side <= dims.grid:
            return [
                (
                    "side",
                    f"must be 0 (half the grid) or 1 to the base's {dims.grid} patches per side, "
                    f"got {config.side}",
                )
            ]
        return []

    @property
    def side(self) -> int:
        return self.config.side or max(1, self.dims.grid // 2)

    def output_tokens(self, input_tokens: int) -> int:
        return self.side * self.side

    def resize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 3, side·p, side·p), p = S / the base's patch grid."""
        patch = pixel_values.shape[-1] // self.dims.grid
        size = self.side * patch
        if size == pixel_values.shape[-1]:
            return pixel_values
        # the processor's normalisation is per-channel affine, so resizing after it equals
        # resizing the raw image; antialias so the smaller image averages rather than skips
        resized = F.interpolate(
            pixel_values.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        return resized.to(pixel_values.dtype)
