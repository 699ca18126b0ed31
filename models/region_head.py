"""Dense per-region objective for pretraining a vision tower from scratch (tiny models).

A linear head reads every patch token of the tower's LLaVA feature layer and predicts the
attributes of the scene cell under it (see data.synth.region_targets). Training the tower on
these dense targets first gives the LLM stages features that already separate colour, shape and
position, which an end-to-end from-scratch run takes far longer to find.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionHead(nn.Module):
    def __init__(self, width: int, classes: tuple[int, ...]):
        super().__init__()
        self.classes = classes
        self.proj = nn.Linear(width, sum(classes))

    def loss(self, patches: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (B, N, Dv), targets (B, N, A) → (mean CE over attributes, accuracy (A,))."""
        logits = self.proj(patches).split(list(self.classes), dim=-1)
        losses, accs = [], []
        for a, attr_logits in enumerate(logits):
            target = targets[..., a]
            losses.append(F.cross_entropy(attr_logits.flatten(0, 1), target.flatten()))
            accs.append((attr_logits.argmax(-1) == target).float().mean())
        return torch.stack(losses).mean(), torch.stack(accs)
