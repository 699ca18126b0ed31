"""DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (arXiv 2503.02175).

Training-free: keep the k visual tokens that form a maximally diverse subset, found greedily for
the max-min problem on cosine distance — start from the token farthest on average from the
others, then repeatedly add the token whose nearest kept token is farthest. vtc applies it to
the projected visual tokens just before the LLM, per sample, batched over the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.compressors import register
from models.compressors.base import TokenBudget
from models.sequence import SequenceState


@dataclass(frozen=True)
class DivPruneConfig:
    tokens: int = 64  # visual tokens kept per image


@register("divprune")
class DivPrune(TokenBudget):
    """Keeps the `tokens` most mutually diverse visual tokens (greedy max-min cosine distance)."""

    stage = "pre_llm"
    Config = DivPruneConfig
    baseline = "divprune"

    def forward(self, state: SequenceState) -> SequenceState:
        visual = state.visual_mask & state.attention_mask
        counts = visual.sum(1)
        if int(counts.max()) <= self.config.tokens:
            return state
        keep = torch.zeros_like(visual)
        for b in range(visual.shape[0]):  # images may hold different numbers of visual tokens
            index = visual[b].nonzero().flatten()
            if index.numel() <= self.config.tokens:
                keep[b, index] = True
                continue
            keep[b, index[select_diverse(state.hidden[b, index], self.config.tokens)]] = True
        return state.keep(~visual | keep)


def select_diverse(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k rows of `tokens` (N, H) chosen greedily for max-min cosine distance."""
    unit = F.normalize(tokens.float(), dim=-1)
    distance = 1.0 - unit @ unit.T  # (N, N)
    chosen = [int(distance.mean(1).argmax())]
    nearest = distance[chosen[0]].clone()  # distance of every token to its nearest chosen one
    for _ in range(k - 1):
        nearest[chosen] = -1.0
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
    return torch.tensor(sorted(chosen), device=tokens.device)
