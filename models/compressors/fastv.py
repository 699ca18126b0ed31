"""FastV: An Image is Worth 1/2 Tokens After Layer 2 (arXiv 2403.06764). Training-free.

After decoder layer K, keep the k visual tokens that received the most attention (averaged over
heads) from the last prompt token — or from all text tokens — at layer K; the later layers see
the shortened sequence. The attention probabilities of layer K alone are recomputed by the
decoder loop (`models.llm.attention_probs`), so the model keeps its fast attention kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.compressors import register
from models.compressors.base import ModelDims, TokenBudget
from models.sequence import SequenceState


@dataclass(frozen=True)
class FastVConfig:
    layer: int = 2  # K: rank by this layer's attention, prune before layer K+1
    tokens: int = 64  # visual tokens kept
    query: Literal["last", "text"] = "last"  # whose attention ranks the visual tokens


@register("fastv")
class FastV(TokenBudget):
    """Prunes to the `tokens` most-attended visual tokens after decoder layer `layer`."""

    stage = "in_llm"
    Config = FastVConfig

    def __init__(self, config: FastVConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.attention_layers = (config.layer,)

    @classmethod
    def check_config(cls, config: FastVConfig, dims: ModelDims):
        problems = super().check_config(config, dims)
        if not 0 <= config.layer < dims.llm_layers - 1:
            problems.append(
                (
                    "layer",
                    f"must be in 0..{dims.llm_layers - 2} (a layer with one after it), got {config.layer}",
                )
            )
        return problems

    def output_tokens(self, input_tokens: int) -> int:
        return input_tokens  # the LLM's input is unchanged; later layers see min(tokens, input)

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        if layer_idx != self.config.layer + 1 or state.attention is None:
            return state
        visual = state.visual_mask & state.attention_mask
        if int(visual.sum(1).max()) <= self.config.tokens:
            return state
        attention = state.attention.mean(1)  # (B, T, T), averaged over heads
        if self.config.query == "last":
            received = attention[torch.arange(attention.shape[0]), state.last_index()]  # (B, T)
        else:
            text = state.attention_mask & ~state.visual_mask
            received = (attention * text[:, :, None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
        return state.keep_top_visual(received, self.config.tokens)
