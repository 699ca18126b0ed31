"""The LLM side: vtc's own loop over the HF decoder layers, with a hook point before each.

The HF `LlamaModel.forward` assumes one sequence length for all layers. In-LLM compressors
shorten the sequence mid-stack, so vtc runs the layers itself (embedding, rotary embeddings,
each `decoder_layer(...)`, final norm, lm_head), calling the HF modules unchanged. The KV cache
is HF's `DynamicCache`, whose layers each keep their own length; `KVState` remembers which cached
keys are real for every layer, so layers after a shortening decode against their shorter cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from models.sequence import SequenceState, attention_bias


@dataclass
class KVState:
    """Cache of a generation in progress. key_masks[l]: (B, K_l) real-key mask of layer l."""

    cache: DynamicCache
    key_masks: list[torch.Tensor | None]
    next_position: torch.Tensor  # (B,) position id of the next token


class LanguageModel(nn.Module):
    """Wraps an HF decoder (`LlamaModel`-like: embed_tokens, layers, norm, rotary_emb) + lm_head."""

    def __init__(self, body: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.body = body
        self.lm_head = lm_head

    @property
    def config(self):
        return self.body.config

    @property
    def num_layers(self) -> int:
        return len(self.body.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(input_ids)

    def run(self, state: SequenceState, in_llm=(), kv: KVState | None = None) -> SequenceState:
        """Runs every decoder layer (calling each in-LLM compressor's `before_layer` first) and
        the final norm. Returns the final state (hidden = normed last hidden states)."""
        bias = rotary = None
        for idx, layer in enumerate(self.body.layers):
            before = state
            for component in in_llm:
                state = component.before_layer(idx, state)
            key_mask = state.attention_mask
            if kv is not None:
                past = kv.key_masks[idx]
                key_mask = key_mask if past is None else torch.cat([past, key_mask], 1)
                kv.key_masks[idx] = key_mask
            if bias is None or state is not before or kv is not None:
                bias = attention_bias(key_mask, state.hidden.shape[1], state.hidden.dtype)
            if rotary is None or state is not before:
                rotary = self.body.rotary_emb(state.hidden, position_ids=state.position_ids)
            hidden = layer(
                state.hidden,
                attention_mask=bias,
                position_ids=state.position_ids,
                past_key_values=None if kv is None else kv.cache,
                use_cache=kv is not None,
                position_embeddings=rotary,
            )
            attention = None
            if any(idx in c.attention_layers for c in in_llm) and bool(state.visual_mask.any()):
                attention = attention_probs(layer, state.hidden, bias, rotary)
            state = replace(state, hidden=hidden, attention=attention)
        return replace(state, hidden=self.body.norm(state.hidden), attention=None)

    def new_kv(self, state: SequenceState) -> KVState:
        """A fresh cache for generating after `state`'s prompts."""
        next_position = state.position_ids.masked_fill(~state.attention_mask, -1).amax(1).floor().long() + 1
        return KVState(DynamicCache(), [None] * self.num_layers, next_position)


def attention_probs(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, rotary) -> torch.Tensor:
    """(B, heads, T, T) attention probabilities of decoder `layer` on its input `hidden`
    (B, T, H) — recomputed from the layer's own norm, Q/K projections and rotary embedding, so
    the rest of the model keeps its fast attention kernel. Prefill only (no cached keys)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    q = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rotary)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + bias[..., -length:].float()
    return scores.softmax(-1)
