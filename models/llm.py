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

from models.sequence import AttentionRows, SequenceState, attention_bias


@dataclass
class KVState:
    """Cache of a generation in progress. key_masks[l]: (B, K_l) the cached keys layer l may
    attend to; visual_masks[l]: (B, K_l) which of them are visual tokens."""

    cache: DynamicCache
    key_masks: list[torch.Tensor | None]
    next_position: torch.Tensor  # (B,) position id of the next token
    visual_masks: list[torch.Tensor | None] = None

    def hide_visual_keys(self, from_layer: int, samples: torch.Tensor | None = None) -> None:
        """From now on, layers `from_layer`.. no longer attend to the cached visual keys (of the
        (B,) bool `samples`, default all): a decision taken while decoding reaches the keys that
        earlier steps cached."""
        for layer in range(from_layer, len(self.key_masks)):
            if self.key_masks[layer] is None:
                continue
            hide = self.visual_masks[layer]
            if samples is not None:
                hide = hide & samples[:, None]
            self.key_masks[layer] = self.key_masks[layer] & ~hide

    def visual_tokens(self) -> torch.Tensor:
        """(B, L): the visual tokens in each sample's sequence at decoder layer l (after the
        prefill: those that reached that layer, fewer than entered the LLM where a component
        removes some inside it; a key only masked from attention still counts, as it is still
        computed)."""
        return torch.stack([visual.sum(1) for visual in self.visual_masks], 1)


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

    def run(
        self,
        state: SequenceState,
        in_llm=(),
        kv: KVState | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> SequenceState:
        """Runs decoder layers `start`..`stop`-1 (default: all), calling each in-LLM component's
        `before_layer` first. Run to the last layer, the returned hidden states are normed (the
        LM head's input); stopped earlier, they are the raw output of layer `stop`-1, which a
        later `run(..., start=stop)` continues from (a teacher pass to a guidance layer, or
        several continuations of one state). The returned `attention` holds the rows the
        components asked of layer `stop`-1 (e.g. a teacher's target). Layers attend to
        `state.key_mask` where set, and add `state.key_bias` to their attention scores."""
        stop = self.num_layers if stop is None else stop
        bias = rotary = None
        for idx in range(start, stop):
            layer = self.body.layers[idx]
            before = state
            for component in in_llm:
                state = component.before_layer(idx, state)
            key_mask = (
                state.attention_mask if state.key_mask is None else state.key_mask & state.attention_mask
            )
            if kv is not None:
                past, past_visual = kv.key_masks[idx], kv.visual_masks[idx]
                key_mask = key_mask if past is None else torch.cat([past, key_mask], 1)
                visual = state.visual_mask if past is None else torch.cat([past_visual, state.visual_mask], 1)
                kv.key_masks[idx], kv.visual_masks[idx] = key_mask, visual
            if bias is None or state is not before or kv is not None:
                bias = attention_bias(key_mask, state.hidden.shape[1], state.hidden.dtype)
                if state.key_bias is not None:  # a soft mask: added to every query's scores
                    if kv is not None:
                        raise ValueError("key_bias is for training passes, not cached generation")
                    bias = bias + state.key_bias[:, None, None, :].to(bias.dtype)
            if rotary is None or state is not before:
                rotary = self.body.rotary_emb(state.hidden, position_ids=state.position_ids)
            hidden = layer(  # HF's layer recomputes itself in backward when checkpointing is on
                state.hidden,
                attention_mask=bias,
                position_ids=state.position_ids,
                cache=None if kv is None else kv.cache,
                use_cache=kv is not None,
                position_embeddings=rotary,
            )
            attention = {}
            if bool(state.visual_mask.any()):  # prefill; decoding steps carry no visual token
                for component in in_llm:
                    if idx in component.attention_layers:
                        rows, valid = component.attention_queries(idx, state)
                        probs = attention_rows(layer, state.hidden, bias, rotary, rows)
                        attention[id(component)] = AttentionRows(probs, rows, valid)
            state = replace(state, hidden=hidden, attention=attention or None)
        if stop < self.num_layers:
            return state
        return replace(state, hidden=self.body.norm(state.hidden))

    def new_kv(self, state: SequenceState) -> KVState:
        """A fresh cache for generating after `state`'s prompts."""
        return KVState(
            DynamicCache(), [None] * self.num_layers, next_positions(state), [None] * self.num_layers
        )


def next_positions(state: SequenceState) -> torch.Tensor:
    """(B,) the position id after each sample's last real token (positions may be fractional)."""
    return state.position_ids.masked_fill(~state.attention_mask, -1).amax(1).floor().long() + 1


def attention_rows(
    layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, rotary, rows: torch.Tensor
) -> torch.Tensor:
    """(B, heads, Q, T) attention probabilities of decoder `layer` for the query positions
    `rows` (B, Q) of its input `hidden` (B, T, H), recomputed from the layer's own norm, Q/K
    projections and rotary embedding (so the model keeps its fast attention kernel) for those
    rows only: never a (B, heads, T, T) tensor. Prefill only (no cached keys)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, width = x.shape
    queries = rows.shape[1]
    q = attn.q_proj(x.gather(1, rows[..., None].expand(-1, -1, width)))
    q = q.view(batch, queries, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary  # (B, T, head_dim)
    at_rows = rows[..., None].expand(-1, -1, cos.shape[-1])
    q = apply_rotary_pos_emb(q, q, cos.gather(1, at_rows), sin.gather(1, at_rows))[0]
    k = apply_rotary_pos_emb(k, k, cos, sin)[0]
    k = repeat_kv(k, attn.num_key_value_groups)
    bias = bias[..., -length:].expand(batch, 1, length, length)
    bias = bias.gather(2, rows[:, None, :, None].expand(-1, 1, -1, length))  # (B, 1, Q, T)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + bias.float()
    return scores.softmax(-1)
