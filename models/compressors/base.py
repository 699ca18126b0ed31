"""The one interface every compressor and projector implements.

A component declares where it acts (`stage`) and how many visual tokens it emits
(`output_tokens`). The model assembly calls it at that place:

- "encoder":   inside the vision tower. `extend_embeddings` appends extra tokens (e.g. registers)
               to the ViT input (B, 1+N, Dv) → (B, 1+N+M, Dv); `select` picks the output
               tokens from the tower's hidden states → (B, M, Dv) (with `uses_cls_attention`,
               also given the feature layer's CLS attention (B, N) and keys (B, N, d)).
- "projector": the projector slot. `forward(features)` maps `VisionFeatures` → (B, N', H).
- "pre_llm":   `forward(state)` on the merged `SequenceState` before the first decoder layer.
- "in_llm":    `before_layer(layer_idx, state)` before every decoder layer; returns the state
               (shortened or not). Must be a no-op on a state without visual tokens (decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

Stage = Literal["encoder", "projector", "pre_llm", "in_llm"]
STAGES: tuple[str, ...] = ("encoder", "projector", "pre_llm", "in_llm")


@dataclass(frozen=True)
class ModelDims:
    """What a component needs to know about the host model to size itself."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    grid: int  # patches per side of the base image (24 for CLIP-L/336)
    llm_width: int
    llm_layers: int
    llm_heads: int


@dataclass
class VisionFeatures:
    """Output of the vision tower for a batch of images.

    selected:      (B, N, Dv) the tokens LLaVA feeds the projector (layer -2, CLS dropped), or an
                   encoder compressor's selected tokens
    hidden_states: tuple of (B, 1+N(+M), Dv), entry 0 = embeddings (HF convention), CLS at 0
    grid:          patches per side when `selected` is a full patch grid, else None
    """

    selected: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    grid: int | None


@dataclass(frozen=True)
class NoParams:
    """Config of a component without parameters."""


class Compressor(nn.Module):
    stage: ClassVar[str]
    Config: ClassVar[type] = NoParams

    def __init__(self, config, dims: ModelDims):
        super().__init__()
        self.config = config
        self.dims = dims

    def output_tokens(self, input_tokens: int) -> int:
        """Visual tokens this component emits (for dynamic ones: the expected number) when
        `input_tokens` tokens come in."""
        return input_tokens

    # encoder stage
    uses_cls_attention: ClassVar[bool] = False  # select() also gets cls_attention= and keys=

    def extend_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, hidden_states: tuple[torch.Tensor, ...], num_patches: int) -> torch.Tensor:
        raise NotImplementedError

    # in_llm stage
    attention_layers: tuple[int, ...] = ()  # layers whose attention probabilities this component reads

    def before_layer(self, layer_idx: int, state):
        raise NotImplementedError

    @classmethod
    def check_config(cls, config, dims: ModelDims) -> list[tuple[str, str]]:
        """(key, message) problems of `config` on a model of `dims`, for recipe validation."""
        return []


class TokenBudget(Compressor):
    """A pruner whose Config has `tokens`: the number of visual tokens it keeps per image."""

    @classmethod
    def check_config(cls, config, dims: ModelDims) -> list[tuple[str, str]]:
        return [] if config.tokens >= 1 else [("tokens", f"must be ≥ 1, got {config.tokens}")]

    def output_tokens(self, input_tokens: int) -> int:
        return min(self.config.tokens, input_tokens)
