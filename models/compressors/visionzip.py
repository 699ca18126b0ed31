"""VisionZip: Longer is Better but Not Necessary in Vision Language Models (arXiv 2412.04467).

Training-free, inside the vision tower's output: of the N patch tokens of the feature layer keep
the "dominant" ones that CLS attends to most (attention averaged over heads), then merge the rest
into a few "contextual" tokens: evenly spaced remaining tokens become centres, every other
remaining token joins the centre its key is most similar to, and each contextual token is the
mean of its group. The split follows the paper's 54 dominant + 10 contextual of 64.
Needs a tower with a CLS token (CLIP); the output is a token list (no grid)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.compressors import register
from models.compressors.base import ModelDims, TokenBudget


@dataclass(frozen=True)
class VisionZipConfig:
    tokens: int = 64  # visual tokens kept per image (dominant + contextual)
    contextual_share: float = 10 / 64  # of `tokens`, merged contextual tokens


@register("visionzip")
class VisionZip(TokenBudget):
    """Keeps the `tokens` of CLS-attention-dominant and similarity-merged contextual tokens."""

    stage = "encoder"
    Config = VisionZipConfig
    baseline = "visionzip"
    uses_cls_attention = True

    def __init__(self, config: VisionZipConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.feature_layer = -2  # LLaVA's; VisionTower passes that layer's signals

    @classmethod
    def check_config(cls, config: VisionZipConfig, dims: ModelDims):
        problems = super().check_config(config, dims)
        if not 0.0 <= config.contextual_share < 1.0:
            problems.append(("contextual_share", f"must be in [0, 1), got {config.contextual_share}"))
        if dims.prefix_tokens < 1:
            problems.append(
                ("tokens", "VisionZip ranks patches by the CLS token's attention; this tower has no CLS")
            )
        return problems

    def split(self, available: int) -> tuple[int, int]:
        """(dominant, contextual) counts for `available` patch tokens."""
        tokens = min(self.config.tokens, available)
        contextual = round(tokens * self.config.contextual_share) if tokens > 1 else 0
        contextual = max(contextual, 1) if tokens > 1 and self.config.contextual_share > 0 else contextual
        return tokens - contextual, contextual

    def extend_embeddings(self, embeddings: torch.Tensor, views) -> torch.Tensor:
        return embeddings  # adds nothing to the ViT input

    def select(
        self, hidden_states, num_patches: int, views=None, cls_attention=None, keys=None
    ) -> torch.Tensor:
        """hidden_states[-2] (B, P+N, Dv), cls_attention (B, N), keys (B, N, d) → (B, tokens, Dv)."""
        prefix = self.dims.prefix_tokens
        patches = hidden_states[self.feature_layer][:, prefix : prefix + num_patches]
        batch, count, width = patches.shape
        dominant, contextual = self.split(count)
        if dominant + contextual >= count:
            return patches
        top = cls_attention.topk(dominant, dim=1).indices.sort(1).values  # (B, Kd), spatial order
        kept = patches.gather(1, top[..., None].expand(-1, -1, width))
        if contextual == 0:
            return kept
        is_rest = torch.ones(batch, count, dtype=torch.bool, device=patches.device)
        is_rest.scatter_(1, top, False)
        rest = is_rest.nonzero()[:, 1].view(batch, count - dominant)  # (B, R) indices, ascending
        rest_tokens = patches.gather(1, rest[..., None].expand(-1, -1, width))  # (B, R, Dv)
        rest_keys = F.normalize(
            keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1])).float(), dim=-1
        )
        step = rest.shape[1] // contextual
        centres = torch.arange(contextual, device=patches.device) * step  # evenly spaced among the rest
        similarity = rest_keys @ rest_keys[:, centres].transpose(1, 2)  # (B, R, Kc)
        group = similarity.argmax(-1)  # (B, R): each rest token's centre
        group[:, centres] = torch.arange(contextual, device=patches.device)  # a centre is its own group
        one_hot = F.one_hot(group, contextual).to(rest_tokens.dtype)  # (B, R, Kc)
        merged = (one_hot.transpose(1, 2) @ rest_tokens) / one_hot.sum(1)[..., None]  # (B, Kc, Dv)
        return torch.cat([kept, merged], dim=1)
