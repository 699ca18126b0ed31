"""CoViPAL: Layer-wise Contextualized Visual Token Pruning for LVLMs (arXiv 2508.17243).

A light, text-conditioned scorer gives every visual token an importance score from the hidden
states entering decoder layer L_p (`layer`; 0 = before the first) and the instruction; the top
r·n_v tokens of each sample (reserve ratio `reserve`, or a fixed `tokens` budget) go on, the rest
are removed before any later layer processes them. The LLM stays frozen.

What the paper gives, and vtc's reading where it is silent (the authors' code is not public):

- Scorer (paper: "a light plug-and-play module" from visual and text context; no architecture).
  vtc: both inputs layer-normed; each visual token is a query (Linear H → d) that attends, in one
  multi-head cross-attention, to the instruction after the image (`SequenceState.prompt_mask` —
  never an answer token) plus one learned null token (so a sample without instruction text, e.g.
  a caption prompt, still has something to attend to); an MLP on [query, context] gives the
  score. d = `width` (default H/4): 15.8 M parameters, 0.24 % of LLaVA-1.5-7B's LLM
  (`tests/test_covipal.py`).
- Stage 1, attention-guided (paper: target = the attention a visual token receives at a deeper
  guidance layer L_g of the frozen, unpruned LLM, summed over heads and over the query positions
  after the image span; MSE between normalised scores and targets). vtc: the queries are the
  instruction positions after the image (answers excluded, as the scorer never sees them) by
  default; `guidance_queries: last` takes the last prompt token only (FastV's query), and
  `after_image` every token after the image, a training sample's answer included (the paper's
  wording read literally; only the target reads the answer, never the scorer; with multi-turn
  samples every later turn counts too, so pair it with `data.turns: 1`). The teacher pass runs
  the frozen LLM from L_p to L_g only (`llm.run(stop=L_g + 1)`), reading the attention rows of
  those queries at L_g (never a T × T matrix); both scores and targets are standardised per
  sample over its visual tokens (zero mean, unit variance), so the MSE equals 2·(1 − Pearson
  correlation): only the ranking matters for a top-k, and the attention's scale varies with the
  prompt length. Runs when the stage's objective minimises `scorer_mse`.
- Stage 2 (not published). vtc's reading, as re-implementations do: train the scorer end to end
  under the LM loss with the LLM frozen through a soft mask instead of the hard top-k: every
  visual token stays, and each later layer adds log σ((z − τ)/T) to the attention scores of
  that token's key (z its standardised score, τ the sample's k-th largest z, T = `temperature`),
  so the LM loss moves scores near the cut. Runs when the stage's objective minimises `lm`.
  T matters, measured on the tiny base (README, CoViPAL): at T = 0.5 a token one standard
  deviation below the cut still gets log σ(−2) ≈ −2 on its scores, so the frozen LLM trains
  seeing far more than the k tokens it will see at inference, and stage 2 left the scorer where
  stage 1 had put it; T = 0.1 (≈ −10: nearly the hard top-k, with gradients at the cut) raised
  it by 20–30 points, and sharper masks (0.05, 0.02; one seed each) by less. Hence the default
  0.1.
- Outside training the hard top-k applies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor, ModelDims
from models.gather import as_call
from models.sequence import SequenceState, positions_of


@dataclass(frozen=True)
class CoViPALConfig:
    layer: int = 0  # L_p: prune before this decoder layer (0: before the first)
    guidance_layer: int = 16  # L_g: the frozen LLM layer whose attention the scorer learns
    # whose attention at L_g is the target: every instruction token after the image; only the
    # last prompt token, the one that predicts the answer (FastV's query); or every token after
    # the image, a training sample's answer included (the paper's wording read literally)
    guidance_queries: Literal["instruction", "last", "after_image"] = "instruction"
    reserve: float = 0.25  # r: the share of each sample's visual tokens kept
    tokens: int | None = None  # a fixed number of visual tokens kept instead (per sample)
    width: int | None = None  # d of the scorer; None = the LLM width / 4
    heads: int = 4
    temperature: float = 0.1  # of the soft mask (stage 2); sharp, near the hard top-k: see below


class _GuidanceReader:
    """Asks the LLM for the attention rows of each sample's guidance queries at one layer:
    `CoViPALConfig.guidance_queries`."""

    def __init__(self, layer: int, queries: str):
        self.attention_layers = (layer,)
        self.queries = queries

    def attention_queries(self, layer_idx: int, state: SequenceState):
        if self.queries == "last":
            last = state.last_prompt_index()[:, None]  # (B, 1)
            return last, state.prompt_mask.any(1, keepdim=True)
        return positions_of(query_mask(state, self.queries))

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        return state


def query_mask(state: SequenceState, queries: str) -> torch.Tensor:
    """(B, T) bool: the positions whose attention guides the scorer (`instruction` or
    `after_image`; `last` is one position per sample)."""
    if queries == "after_image":
        return state.prompt_mask | state.response_mask
    return state.prompt_mask


def standardise(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, M) values → zero mean, unit variance over each row's valid entries (0 elsewhere)."""
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (values * valid).sum(1, keepdim=True) / count
    centred = (values - mean) * valid
    # clamped before the root: a row without valid entries gets a zero gradient, not 0·∞
    std = (centred.pow(2).sum(1, keepdim=True) / count).clamp(min=1e-12).sqrt()
    return centred / std


@register("covipal")
class CoViPAL(Compressor):
    """Text-conditioned scorer before decoder layer L_p; keeps the top r·n_v visual tokens."""

    stage = "in_llm"
    Config = CoViPALConfig
    aux_losses = ("scorer_mse",)

    def __init__(self, config: CoViPALConfig, dims: ModelDims):
        super().__init__(config, dims)
        width = config.width or dims.llm_width // 4
        self.visual_norm = nn.LayerNorm(dims.llm_width)
        self.text_norm = nn.LayerNorm(dims.llm_width)
        self.query = nn.Linear(dims.llm_width, width)
        self.null = nn.Parameter(torch.zeros(1, 1, dims.llm_width))
        # The cross-attention's own projections, written out rather than nn.MultiheadAttention:
        # `query` already projects the visual tokens (MHA would add a second d × d projection),
        # and MHA's generic forward took 0.6–0.7 ms of the scorer's 1.0–1.4 ms on the tiny model
        # at batch 8 (this one 0.4–0.5 ms of 0.9).
        self.key_value = nn.Linear(dims.llm_width, 2 * width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))

    @classmethod
    def check_config(cls, config: CoViPALConfig, dims: ModelDims):
        problems = []
        if not 0 <= config.layer < dims.llm_layers:
            problems.append(("layer", f"must be in 0..{dims.llm_layers - 1}, got {config.layer}"))
        if not config.layer <= config.guidance_layer < dims.llm_layers:
            problems.append(
                (
                    "guidance_layer",
                    f"must be in {config.layer}..{dims.llm_layers - 1} (at or after `layer`), "
                    f"got {config.guidance_layer}",
                )
            )
        if not 0 < config.reserve <= 1:
            problems.append(("reserve", f"must be in (0, 1], got {config.reserve}"))
        if config.tokens is not None and config.tokens < 1:
            problems.append(("tokens", f"must be ≥ 1, got {config.tokens}"))
        width = config.width or dims.llm_width // 4
        if width % config.heads:
            problems.append(("heads", f"{config.heads} heads do not divide the scorer width {width}"))
        if config.temperature <= 0:
            problems.append(("temperature", f"must be > 0, got {config.temperature}"))
        return problems

    def kept(self, visual: torch.Tensor) -> torch.Tensor:
        """(B,) visual tokens kept of each sample's (B,) `visual`: ⌈r·n_v⌉ (at least 1), or
        `tokens`."""
        if self.config.tokens is not None:
            return visual.clamp(max=self.config.tokens)
        return torch.ceil(visual * self.config.reserve).long().clamp(min=1).minimum(visual)

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        return {"tokens": budget}  # the trained scorer keeps any number (vtc evaluate --tokens)

    def output_tokens(self, input_tokens: int) -> int:
        return input_tokens  # the LLM's input is unchanged; layers from L_p on see fewer

    def score(self, state: SequenceState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of each sample's visual tokens from the state entering layer L_p: (B, M)
        scores, the (B, M) visual columns and their validity."""
        columns, valid = positions_of(state.visual_mask & state.attention_mask)
        text_columns, text_valid = positions_of(state.prompt_mask)
        hidden = state.hidden.detach()  # the host stays as it is: only the scorer learns
        gather = lambda cols: hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))  # noqa: E731
        queries = self.query(self.visual_norm(gather(columns)))  # (B, M, d)
        text = self.text_norm(gather(text_columns))  # (B, Q, H)
        keys = torch.cat([self.null.expand(text.shape[0], -1, -1).to(text.dtype), text], 1)
        seen = torch.cat([torch.ones_like(text_valid[:, :1]), text_valid], 1)  # the null always
        context = self.mix(self.attend(queries, self.key_value(keys), seen))
        return self.head(torch.cat([queries, context], -1)).squeeze(-1), columns, valid

    def attend(self, queries: torch.Tensor, key_value: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of (B, M, d) queries to the (B, K, 2d) keys and values of the
        (B, K) `seen` text tokens: (B, M, d)."""
        heads, (batch, count, width) = self.config.heads, queries.shape
        split = lambda x: x.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
        key, value = key_value.chunk(2, -1)
        mixed = F.scaled_dot_product_attention(
            split(queries), split(key), split(value), attn_mask=seen[:, None, None, :]
        )
        return mixed.transpose(1, 2).reshape(batch, count, width)

    def guidance_targets(
        self, state: SequenceState, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention the guidance queries (`guidance_queries`) pay each visual token
        (columns (B, M)) at the guidance layer of the frozen, unpruned LLM, summed over heads and
        queries: (B, M), and (B,) whether a sample has instruction tokens (a target) at all."""
        reader = _GuidanceReader(self.config.guidance_layer, self.config.guidance_queries)
        with torch.no_grad():
            teacher = self.host.llm.run(
                state, [reader], start=self.config.layer, stop=self.config.guidance_layer + 1
            )
        rows = teacher.attention[id(reader)]
        received = (rows.probs.sum(1) * rows.valid[..., None]).sum(1)  # (B, T)
        return received.gather(1, columns), state.prompt_mask.any(1)

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        if layer_idx != self.config.layer or not bool(state.visual_mask.any()):
            return state
        scores, columns, valid = as_call(self, self.score, state)  # gathers `null` under ZeRO-3
        terms = self.training_terms()
        if "scorer_mse" in terms:
            target, has_text = self.guidance_targets(state, columns)
            mask = valid & has_text[:, None]
            error = (standardise(scores, mask) - standardise(target.float(), mask)).pow(2)
            self.add_loss("scorer_mse", (error * mask).sum() / mask.sum().clamp(min=1))
        full = torch.full(state.visual_mask.shape, float("-inf"), device=scores.device, dtype=scores.dtype)
        full = full.scatter(1, columns, scores.masked_fill(~valid, float("-inf")))
        keep = self.kept(valid.sum(1))
        if "lm" in terms:  # stage 2: a soft mask the LM loss trains through
            z = standardise(scores, valid)
            threshold = z.masked_fill(~valid, float("-inf")).sort(1, descending=True).values
            tau = threshold.gather(1, (keep - 1).clamp(min=0)[:, None]).detach()
            log_keep = F.logsigmoid((z - tau) / self.config.temperature).masked_fill(~valid, 0.0)
            bias = torch.zeros(state.visual_mask.shape, device=z.device, dtype=z.dtype).scatter(
                1, columns, log_keep
            )
            bias = bias.masked_fill(~(state.visual_mask & state.attention_mask), 0.0)
            return replace(state, key_bias=bias if state.key_bias is None else state.key_bias + bias)
        return state.keep_top_visual(full.detach(), keep)
