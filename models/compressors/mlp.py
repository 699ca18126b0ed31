"""The LLaVA-1.5 projector (`mlp2x_gelu`), the uncompressed baseline: every patch → one token.

Improved Baselines with Visual Instruction Tuning (LLaVA-1.5), arXiv 2310.03744.
Module names match llava-hf's `multi_modal_projector` so its weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor, ModelDims, NoParams, VisionFeatures


@register("mlp2x_gelu")
class MlpProjector(Compressor):
    """Linear(Dv→H) → GELU → Linear(H→H) on every patch token."""

    stage = "projector"
    Config = NoParams

    def __init__(self, config: NoParams, dims: ModelDims):
        super().__init__(config, dims)
        self.linear_1 = nn.Linear(dims.vision_width, dims.llm_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(dims.llm_width, dims.llm_width)

    def start_from_base_projector(self, projector: nn.Module) -> bool:
        self.load_state_dict(projector.state_dict())  # the same module names as llava-hf's
        return True

    def forward(self, features: VisionFeatures) -> torch.Tensor:
        """(B, N, Dv) → (B, N, H)."""
        return self.linear_2(self.act(self.linear_1(features.selected)))
