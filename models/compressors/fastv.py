"""FastV: An Image is Worth 1/2 Tokens After Layer 2 (arXiv 2403.06764). Training-free.

After decoder layer K, keep the k visual tokens that received the most attention (averaged over
heads) from the last prompt token — or from all text tokens — at layer K; the later layers see
the shortened sequence. The attention probabilities of layer K alone are recomputed by the
decoder loop for the query rows it reads only (`models.llm.attention_rows`), so the model keeps
its fast attention kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    baseline = "fastv"

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

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        return {"layer": min(2, dims.llm_layers - 2), "tokens": budget}

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        attention = self.read_attention(state)
        if layer_idx != self.config.layer + 1 or attention is None:
            return state
        visual = state.visual_mask & state.attention_mask
        if int(visual.sum(1).max()) <= self.config.tokens:
            return state
        return state.keep_top_visual(attention.received(), self.config.tokens)

    def attention_queries(self, layer_idx: int, state: SequenceState):
        """`last`: the last prompt token; `text`: every text token before the answer."""
        return (
            super().attention_queries(layer_idx, state)
            if self.config.query == "last"
            else state.text_queries()
        )
