"""DyVTE: Dynamic Visual-Token Exit for multimodal LLMs (arXiv 2411.19628; code DoubtedSteam/DyVTE).

One small router per decoder layer decides, from that layer's output, whether the visual tokens
are still needed; a sample whose router says "exit" loses all of its visual tokens in every later
layer (and so in their KV cache). The LLM stays frozen; only the routers learn.

- Router k: `Linear(2H → hidden, no bias) → GELU → Linear(hidden → 2, no bias)`, Xavier-uniform
  init, class 1 = exit. Input: the output of layer k at [the mean of the instruction tokens
  between the image and the answer but the last one; the last prompt token] (zeros for the mean
  when the instruction is that one token). Routers read layers 0..N−2: an exit after the last
  layer would save nothing.
- Inference (prefill): after layer k, every sample still holding visual tokens asks router k and
  drops them all if it says exit (its probability of exit above `exit_confidence`; 0.5, the
  default, is the authors' argmax; higher trades FLOPs for accuracy with the same routers) —
  at most one exit per sample, each sample at its own layer,
  re-padded, so a batch answers as its samples do one by one. Decoding steps carry no visual
  token and never ask a router. `statistics()` counts the exit layers (`none`: never exited).
- Training (objective `aux`, LLM frozen), the authors' rule: each step draws one layer k
  uniformly (from the step and `seed`, so a resumed run draws the same layers); router k scores
  the detached feature; from layer k + 1 on, the forward itself is the normal continuation and
  the component runs a second one with the visual keys hidden from every later query. Per sample,
  over its answer tokens: label 1 (exit) iff the two continuations' argmax answers agree on more
  than `agreement` of the tokens and the hidden-image loss is below `loss_ratio` × the normal
  loss; `router_ce` is the router's cross-entropy against it. Logged per step: the drawn layer,
  the label rate and the router's accuracy. Samples without answer tokens are left out.
  Multi-turn conversations (the authors train on single-turn ones): the feature is the first
  instruction, the label judges every answer of the conversation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data import IGNORE_INDEX
from models.compressors import register
from models.compressors.base import Compressor, ModelDims, Progress
from models.sequence import SequenceState


@dataclass(frozen=True)
class DyVTEConfig:
    hidden: int = 2048  # router width, as published
    agreement: float = 0.99  # exit label: argmax answers agree on more than this share ...
    loss_ratio: float = 1.03  # ... and the hidden-image loss is below this × the normal loss
    exit_confidence: float = 0.5  # inference: exit iff the router's P(exit) is above this (argmax)
    seed: int = 0  # of the per-step layer draw


def router(width: int, hidden: int) -> nn.Sequential:
    layers = nn.Sequential(
        nn.Linear(2 * width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, 2, bias=False)
    )
    for layer in (layers[0], layers[2]):
        nn.init.xavier_uniform_(layer.weight)
    return layers


def answer_scores(
    state: SequenceState, lm_head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer token of a final state: (its cross-entropy, its argmax token) at the (B, T−1)
    positions `where` that have a target; returns (loss, argmax, where), the first two flat."""
    targets = state.labels[:, 1:]
    where = targets != IGNORE_INDEX
    logits = lm_head(state.hidden[:, :-1][where]).float()
    return F.cross_entropy(logits, targets[where], reduction="none"), logits.argmax(-1), where


def exit_labels(
    normal: SequenceState, masked: SequenceState, lm_head: nn.Module, agreement: float, loss_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) exit labels from the two continuations' answers, and (B,) which samples have answer
    tokens at all. Label 1 iff argmax agreement > `agreement` and masked loss < `loss_ratio` ×
    normal loss (each the mean over the sample's answer tokens)."""
    normal_loss, normal_top, where = answer_scores(normal, lm_head)
    masked_loss, masked_top, _ = answer_scores(masked, lm_head)
    rows = where.nonzero()[:, 0]
    count = where.sum(1)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(where.shape[0], device=values.device).index_add(0, rows, values.float())
        return total / count.clamp(min=1)

    agree = per_sample(normal_top == masked_top)
    label = (agree > agreement) & (per_sample(masked_loss) < loss_ratio * per_sample(normal_loss))
    return label.long(), count > 0


@register("dyvte")
class DyVTE(Compressor):
    """Per-layer routers that drop all of a sample's visual tokens once they are not needed."""

    stage = "in_llm"
    Config = DyVTEConfig
    aux_losses = ("router_ce",)
    scores_answers = True  # the two continuations' answer scores of its exit labels
    sparse_gradients = True  # one router learns per step
    trains_one_part_per_step = True
    # an inference knob: the same routers exit more or less (`vtc evaluate --setting`)
    stage_settings = ("exit_confidence",)

    def __init__(self, config: DyVTEConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.routers = nn.ModuleList(
            router(dims.llm_width, config.hidden) for _ in range(dims.llm_layers - 1)
        )
        self.drawn: int | None = None  # the layer whose router learns this step
        self._pending = None  # (router logits, hidden-image final state) until after_llm
        self._weights = None  # (layout, feature weights) of the last state seen
        self.reset_statistics()

    @classmethod
    def check_config(cls, config: DyVTEConfig, dims: ModelDims):
        problems = []
        if dims.llm_layers < 2:
            problems.append(("name", "DyVTE needs an LLM of at least 2 layers"))
        if config.hidden < 1:
            problems.append(("hidden", f"must be ≥ 1, got {config.hidden}"))
        if not 0 < config.agreement <= 1:
            problems.append(("agreement", f"must be in (0, 1], got {config.agreement}"))
        if config.loss_ratio <= 0:
            problems.append(("loss_ratio", f"must be > 0, got {config.loss_ratio}"))
        if not 0 < config.exit_confidence < 1:
            problems.append(("exit_confidence", f"must be in (0, 1), got {config.exit_confidence}"))
        return problems

    def output_tokens(self, input_tokens: int) -> int:
        return input_tokens  # the LLM's input is unchanged; exits shorten later layers

    def set_progress(self, progress: Progress | None) -> dict[str, float]:
        super().set_progress(progress)
        if progress is None or "router_ce" not in progress.terms:
            self.drawn = None
            return {}
        draw = torch.Generator().manual_seed(self.config.seed * 1_000_003 + progress.step)
        self.drawn = int(torch.randint(len(self.routers), (), generator=draw))
        return {"layer": float(self.drawn)}

    def feature(self, state: SequenceState) -> torch.Tensor:
        """(B, 2H): [mean of the instruction tokens but the last, the last prompt token]."""
        batch = state.hidden.shape[0]
        return torch.bmm(self.feature_weights(state), state.hidden).reshape(batch, -1)

    def feature_weights(self, state: SequenceState) -> torch.Tensor:
        """(B, 2, T) weights whose product with the hidden states (B, T, H) is the feature: row 0
        averages the instruction tokens but the last (all zeros when there are none), row 1 picks
        the last prompt token. They depend on the layout only, which stays the same from layer to
        layer until a component re-pads the batch (new mask tensors), so a prefill builds them
        once, not once per router: the routers' time is then mostly their MLPs."""
        layout = (state.attention_mask, state.visual_mask, state.role, state.labels, state.hidden.dtype)
        cached = self._weights
        if cached is not None and all(a is b for a, b in zip(cached[0], layout, strict=True)):
            return cached[1]
        last = state.last_prompt_index().clamp(min=0)  # -1: an answer from the first token on
        columns = torch.arange(state.hidden.shape[1], device=last.device)[None]
        instruction = (state.prompt_mask & (columns != last[:, None])).to(state.hidden.dtype)
        mean = instruction / instruction.sum(1, keepdim=True).clamp(min=1)
        weights = torch.stack([mean, (columns == last[:, None]).to(mean.dtype)], 1)
        self._weights = (layout, weights)
        return weights

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        layer = layer_idx - 1  # router `layer` reads that layer's output, the input of this one
        if layer < 0 or not bool((state.visual_mask & state.attention_mask).any()):
            return state
        if self.training and self.drawn is not None:
            if layer == self.drawn:
                logits = self.routers[layer](self.feature(state).detach())
                others = [c for c in self.host.components() if c.stage == "in_llm" and c is not self]
                with torch.no_grad():
                    masked = self.host.llm.run(state.hide_visual_keys(), others, start=layer_idx)
                self._pending = (logits, masked)
            return state  # the forward goes on as the normal continuation
        holding = (state.visual_mask & state.attention_mask).any(1)
        exiting = self.wants_exit(layer, state) & holding
        self._count(layer, exiting, holding)
        if not bool(exiting.any()):
            return state
        return state.keep(~(state.visual_mask & exiting[:, None]))

    def wants_exit(self, layer: int, state: SequenceState) -> torch.Tensor:
        """(B,) router `layer`'s decision on the output of that layer: True = exit."""
        with torch.no_grad():
            logits = self.routers[layer](self.feature(state)).float()
        # P(exit) > c  ⇔  logit margin > log(c / (1 − c)); at c = 0.5 exactly the argmax (ties stay)
        confidence = self.setting("exit_confidence")
        return logits[:, 1] - logits[:, 0] > math.log(confidence / (1 - confidence))

    def after_llm(self, state: SequenceState) -> None:
        if self._pending is None:
            return
        logits, masked = self._pending
        self._pending = None
        label, has_answer = exit_labels(
            state, masked, self.host.llm.lm_head, self.config.agreement, self.config.loss_ratio
        )
        weight = has_answer.float()
        loss = (F.cross_entropy(logits.float(), label, reduction="none") * weight).sum() / weight.sum().clamp(
            min=1
        )
        self.add_loss("router_ce", loss)
        used = has_answer.sum().clamp(min=1)
        self.add_metric("label_rate", (label.float() * weight).sum() / used)
        self.add_metric("router_accuracy", ((logits.argmax(-1) == label).float() * weight).sum() / used)

    def _count(self, layer: int, exiting: torch.Tensor, holding: torch.Tensor) -> None:
        self.exits[layer] += int(exiting.sum())
        if layer == len(self.routers) - 1:  # the last router: who still holds tokens never exits
            self.exits[len(self.routers)] += int((holding & ~exiting).sum())

    def statistics(self) -> dict:
        """Exit layers counted since `reset_statistics` (router k exits before layer k + 1;
        `none`: never), and the share of the LLM's layers that saw the visual tokens, mean
        over those samples (1.0: no exit; the visual tokens per layer are that × the count)."""
        if not any(self.exits):
            return {}
        names = [str(k) for k in range(len(self.routers))] + ["none"]
        layers = self.dims.llm_layers
        seen = sum(count * (k + 1) for k, count in enumerate(self.exits[:-1])) + self.exits[-1] * layers
        return {
            "exit_layers": dict(zip(names, self.exits, strict=True)),
            "visual_layer_share": seen / (sum(self.exits) * layers),
        }

    def reset_statistics(self) -> None:
        self.exits = [0] * self.dims.llm_layers  # routers' layers 0..N−2, then "none"

    def statistics_state(self) -> dict:
        return {"exits": list(self.exits)}

    def load_statistics_state(self, state: dict) -> None:
        self.exits = list(state["exits"])
