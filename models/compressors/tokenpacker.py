"""TokenPacker: Efficient Visual Projector for Multimodal LLM (arXiv 2407.02392).

Replaces the MLP projector and emits (g/s)² tokens for a g×g patch grid (576 → 144 / 64 / 36 at
s = 2 / 3 / 4 on CLIP-L/336). Each output token is a *point query* — the bilinearly
down-sampled feature map at its location — that attends only to the s×s patches of its own
region, whose keys and values come from several ViT layers concatenated (multi-level
features). No residual: the attention output replaces the query. Then an MLP maps to the LLM.

`warm_start` (vtc's option, off by default and not in the paper): the authors train TokenPacker
from scratch on Vicuna, whose LLM never saw a projector; a user who compresses an already tuned
LLaVA starts from an LLM that reads the base's MLP projector. With `warm_start` the point query
(for s = 2 the bilinear down-sampling is exactly the 2×2 mean) is added back to the attention
output, whose out-projection starts at zero, and the output MLP starts as the base's projector:
at step 0 TokenPacker is 2-D average pooling through the base's projector, and training moves it
from there. The attention width must then be the vision width.

Unlike the authors' code nothing is hard-coded to CLIP-L: the tap layers are a config key
(default: LLaVA's relative depths 12/16/22/23 of 24 mapped to this tower's depth), the key/value
width is taps × vision width, and the grid comes from the tower. The per-region attention runs
as one batched multi-head attention over (batch × regions) queries of one token each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor, ModelDims, VisionFeatures

REFERENCE_TAPS = (12, 16, 22, 23)  # of a 24-layer CLIP-L, indices into HF hidden_states


@dataclass(frozen=True)
class TokenPackerConfig:
    scale: int = 2  # s: each output token packs an s×s region → grid²/s² tokens
    taps: tuple[int, ...] | None = None  # hidden_states indices; None = REFERENCE_TAPS rescaled
    width: int | None = None  # attention width; None = the vision width (1024 on CLIP-L)
    heads: int = 8
    # Not in the paper (see the module docstring): start as s×s average pooling through the
    # base's MLP projector, so that a short fine-tune of a LLaVA base starts from there.
    warm_start: bool = False


def default_taps(vision_layers: int) -> tuple[int, ...]:
    """REFERENCE_TAPS at the same relative depth of a `vision_layers`-deep tower (the deepest,
    23 of 24, maps to LLaVA's feature layer -2), without duplicates."""
    taps = [round(t * (vision_layers - 1) / 23) for t in REFERENCE_TAPS]
    return tuple(dict.fromkeys(max(1, t) for t in taps))


LAYER_NORM_EPS = 1e-6  # the authors' (PyTorch's default is 1e-5)


def _mlp_norm(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
    )


@register("tokenpacker")
class TokenPacker(Compressor):
    """Point-to-region attention projector: (B, g², Dv) + taps → (B, (g/s)², H)."""

    stage = "projector"
    Config = TokenPackerConfig

    def __init__(self, config: TokenPackerConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.taps = config.taps or default_taps(dims.vision_layers)
        width = config.width or dims.vision_width
        self.query_proj = nn.Sequential(
            nn.Linear(dims.vision_width, width, bias=False), nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        )
        self.key_proj = _mlp_norm(len(self.taps) * dims.vision_width, width)
        self.value_proj = _mlp_norm(len(self.taps) * dims.vision_width, width)
        self.attention = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.output = nn.Sequential(
            nn.Linear(width, dims.llm_width), nn.GELU(), nn.Linear(dims.llm_width, dims.llm_width)
        )
        self.apply(_init)
        if config.warm_start:  # the attention starts as a no-op next to the point query
            nn.init.zeros_(self.attention.out_proj.weight)
            nn.init.zeros_(self.attention.out_proj.bias)

    @classmethod
    def check_config(cls, config: TokenPackerConfig, dims: ModelDims):
        problems = []
        if config.scale < 1 or dims.grid % config.scale:
            problems.append(
                (
                    "scale",
                    f"must divide the {dims.grid}×{dims.grid} patch grid of the vision tower, "
                    f"got {config.scale} (divisors: {[d for d in range(1, dims.grid + 1) if dims.grid % d == 0]})",
                )
            )
        taps = config.taps or default_taps(dims.vision_layers)
        if any(not 1 <= t <= dims.vision_layers - 1 for t in taps):
            problems.append(
                (
                    "taps",
                    f"hidden_states indices must be in 1..{dims.vision_layers - 1} "
                    f"(LLaVA's feature layer is the deepest), got {list(taps)}",
                )
            )
        width = config.width or dims.vision_width
        if width % config.heads:
            problems.append(("heads", f"{config.heads} heads do not divide the width {width}"))
        if config.warm_start and width != dims.vision_width:
            problems.append(
                (
                    "warm_start",
                    f"needs the attention width to be the vision width {dims.vision_width}, got {width}",
                )
            )
        return problems

    def start_from_base_projector(self, projector: nn.Module) -> bool:
        """With `warm_start`, the output MLP takes the base's MLP projector (same shapes)."""
        if not self.config.warm_start:
            return False
        with torch.no_grad():
            self.output[0].load_state_dict(projector.linear_1.state_dict())
            self.output[2].load_state_dict(projector.linear_2.state_dict())
        return True

    def output_tokens(self, input_tokens: int) -> int:
        return input_tokens // self.config.scale**2

    def output_grid(self, grid: int | None) -> int | None:
        return None if grid is None else grid // self.config.scale

    def forward(self, features: VisionFeatures) -> torch.Tensor:
        """features.selected (B, g², Dv), features.hidden_states[t] (B, P+g², Dv) → (B, (g/s)², H)."""
        x = features.selected
        batch, _, dim = x.shape
        g, s = features.grid, self.config.scale
        if g is None or g % s:
            raise ValueError(f"tokenpacker needs a patch grid divisible by scale {s}, got grid {g}")
        r = g // s  # regions per side
        # Point queries: the feature map down-sampled to r×r, in float32 (bilinear under bf16 is lossy).
        grid_map = x.view(batch, g, g, dim).permute(0, 3, 1, 2).float()
        points = F.interpolate(grid_map, size=(r, r), mode="bilinear", align_corners=False).to(x.dtype)
        queries = self.query_proj(points.flatten(2).transpose(1, 2))  # (B, r², W)
        # Region keys/values from the concatenated taps (prefix tokens dropped): (B, g², taps·Dv).
        multi = torch.cat([features.patches(t, g * g) for t in self.taps], dim=-1)
        keys = _regions(self.key_proj(multi), g, s)  # (B·r², s², W)
        values = _regions(self.value_proj(multi), g, s)
        packed, _ = self.attention(queries.reshape(batch * r * r, 1, -1), keys, values, need_weights=False)
        packed = packed.view(batch, r * r, -1)  # no residual: attention output replaces the query
        if self.config.warm_start:  # ... except in vtc's warm start, which keeps the point query
            packed = packed + points.flatten(2).transpose(1, 2)
        return self.output(packed)


def _regions(tokens: torch.Tensor, g: int, s: int) -> torch.Tensor:
    """(B, g², W) raster-order patches → (B·(g/s)², s², W): the s×s patches of each region."""
    batch, _, width = tokens.shape
    r = g // s
    regions = tokens.view(batch, r, s, r, s, width).permute(0, 1, 3, 2, 4, 5)
    return regions.reshape(batch * r * r, s * s, width)


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
