"""2-D average pooling of the visual tokens before the LLM (training-free baseline, and the
comparison LLaVA's ablations use for learned compressors): a g×g grid → (g/s)² tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from models.compressors import register
from models.compressors.base import Compressor, ModelDims


@dataclass(frozen=True)
class PoolConfig:
    stride: int = 2  # pooling kernel = stride, per side: tokens / stride²


@register("avgpool2d")
class AvgPool2d(Compressor):
    """Average-pools each sample's g×g visual grid with kernel = stride = s before the LLM."""

    stage = "pre_llm"
    Config = PoolConfig
    baseline = "pooling"

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        stride = math.isqrt(visual // budget) if budget else 0
        fits = stride >= 1 and dims.grid % stride == 0 and (dims.grid // stride) ** 2 == budget
        return {"stride": stride} if fits else None

    def output_tokens(self, input_tokens: int) -> int:
        side = math.isqrt(input_tokens)
        return (side // self.config.stride) ** 2

    @classmethod
    def check_config(cls, config: PoolConfig, dims: ModelDims):
        if config.stride < 1 or dims.grid % config.stride:
            return [
                (
                    "stride",
                    f"must be ≥ 1 and divide the {dims.grid}×{dims.grid} patch grid, got {config.stride}",
                )
            ]
        return []

    def forward(self, state):
        """Pools each sample's visual span (a square grid in raster order) and splices it back."""
        counts = state.num_visual
        if int(counts.max()) == 0:
            return state
        side = math.isqrt(int(counts.max()))
        if bool((counts != side * side).any()):
            raise ValueError(f"avgpool2d needs every sample to carry one {side}×{side} grid of visual tokens")
        batch, width = counts.shape[0], state.hidden.shape[-1]
        visual = state.hidden[state.visual_mask & state.attention_mask].view(batch, side, side, width)
        pooled = F.avg_pool2d(visual.permute(0, 3, 1, 2), self.config.stride)  # (B, H, g/s, g/s)
        return state.replace_visual(pooled.flatten(2).transpose(1, 2))
