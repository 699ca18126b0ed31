"""PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction (arXiv 2410.17247). Training-free here (the paper also fine-tunes with it).

The LLM's layers are split into stages at `layers`; at the end of each stage the visual tokens
are ranked by the attention they receive from the last prompt token at that stage's last layer,
and a fraction `keep` of them goes on (0.5 per stage by default: 576 → 288 → 144 → 72)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.compressors import register
from models.compressors.base import Compressor, ModelDims
from models.sequence import SequenceState


@dataclass(frozen=True)
class PyramidDropConfig:
    layers: list[int] = field(
        default_factory=lambda: [8, 16, 24]
    )  # stage boundaries (first layer of next stage)
    keep: float = 0.5  # fraction of the visual tokens kept at each boundary


@register("pdrop")
class PyramidDrop(Compressor):
    """Keeps `keep` of the visual tokens at each stage boundary in `layers`, ranked by attention."""

    stage = "in_llm"
    Config = PyramidDropConfig
    baseline = "pdrop"

    def __init__(self, config: PyramidDropConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.attention_layers = tuple(layer - 1 for layer in config.layers)

    @classmethod
    def check_config(cls, config: PyramidDropConfig, dims: ModelDims):
        problems = []
        if (
            not config.layers
            or sorted(set(config.layers)) != list(config.layers)
            or not (1 <= config.layers[0] and config.layers[-1] < dims.llm_layers)
        ):
            problems.append(
                ("layers", f"increasing layer indices in 1..{dims.llm_layers - 1}, got {config.layers}")
            )
        if not 0.0 < config.keep <= 1.0:
            problems.append(("keep", f"a fraction in (0, 1], got {config.keep}"))
        return problems

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        """Keep ratio λ at 3 evenly spread boundaries such that the mean visual tokens over the
        layers is `budget` (found by bisection)."""
        depth = dims.llm_layers
        layers = sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth})
        bounds = [0, *layers, depth]

        def mean_tokens(keep: float) -> float:
            spans = [visual * keep**i * (bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
            return sum(spans) / depth

        if mean_tokens(0.0) > budget:  # even dropping everything at the first boundary keeps more
            return None
        low, high = 0.0, 1.0
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (middle, high) if mean_tokens(middle) < budget else (low, middle)
        return {"layers": layers, "keep": round((low + high) / 2, 4)}

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        attention = self.read_attention(state)
        if layer_idx not in self.config.layers or attention is None:
            return state
        count = int(state.num_visual.max())
        return state.keep_top_visual(attention.received(), math.ceil(self.config.keep * count))
