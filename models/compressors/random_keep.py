"""Random keep (training-free baseline): keep a fixed-seed random subset of k visual tokens.

The same positions are kept for every image of a call (the subset depends only on the seed and
the number of visual tokens), in their original order, so results are reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.compressors import register
from models.compressors.base import TokenBudget
from models.sequence import SequenceState


@dataclass(frozen=True)
class RandomKeepConfig:
    tokens: int = 64  # visual tokens kept per image
    seed: int = 0


@register("random")
class RandomKeep(TokenBudget):
    """Keeps `tokens` visual tokens chosen uniformly at random (fixed seed) before the LLM."""

    stage = "pre_llm"
    Config = RandomKeepConfig
    baseline = "random"

    def forward(self, state: SequenceState) -> SequenceState:
        visual = state.visual_mask & state.attention_mask
        rank = visual.long().cumsum(1) - 1  # index of each visual token within its sample
        count = int(visual.sum(1).max()) if visual.any() else 0
        if count <= self.config.tokens:
            return state
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.zeros(count, dtype=torch.bool)
        chosen[torch.randperm(count, generator=generator)[: self.config.tokens]] = True
        keep_visual = chosen.to(rank.device)[rank.clamp(min=0)] & visual
        return state.keep(~visual | keep_visual)
