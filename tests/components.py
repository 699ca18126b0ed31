"""Simple components for testing the hook points (registered only by the tests that import them)."""

from dataclasses import dataclass

import torch
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor


@dataclass(frozen=True)
class RegistersConfig:
    count: int = 4


@register("test_registers")
class TestRegisters(Compressor):
    """Encoder stage: append `count` learned tokens to the ViT input, keep only their outputs."""

    stage = "encoder"
    Config = RegistersConfig

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.registers = nn.Parameter(torch.randn(1, config.count, dims.vision_width) * 0.02)

    def output_tokens(self, input_tokens):
        return self.config.count

    def extend_embeddings(self, embeddings):
        return torch.cat(
            [embeddings, self.registers.expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)], 1
        )

    def select(self, hidden_states, num_patches):
        return hidden_states[-2][:, -self.config.count :]


@dataclass(frozen=True)
class KeepFirstConfig:
    keep: int = 5


@register("test_keep_first")
class TestKeepFirst(Compressor):
    """Pre-LLM stage: keep the first `keep` visual tokens of each sample."""

    stage = "pre_llm"
    Config = KeepFirstConfig

    def output_tokens(self, input_tokens):
        return min(self.config.keep, input_tokens)

    def forward(self, state):
        rank = torch.cumsum(state.visual_mask.long(), 1)
        return state.keep(~state.visual_mask | (rank <= self.config.keep))


@dataclass(frozen=True)
class DropAtConfig:
    layer: int = 1


@register("test_drop_visual_at")
class TestDropVisualAt(Compressor):
    """In-LLM stage: before decoder layer `layer`, remove every visual token."""

    stage = "in_llm"
    Config = DropAtConfig

    def before_layer(self, layer_idx, state):
        if layer_idx != self.config.layer or not bool(state.visual_mask.any()):
            return state
        return state.keep(~state.visual_mask)
