"""LLaVolta: Efficient Large Multi-modal Models via Visual Context Compression (arXiv 2406.20092).

Parameter-free and scheduled over training. Before decoder layer K (layers 0..K−1 see every
visual token) each sample's image span is average-pooled in raster order with a 1-D kernel =
stride = S; text is untouched and the later layers, their KV cache and generation work on the
shorter sequence. K = −1 pools the projector's output before the LLM (the positions are then
renumbered, as if the projector had emitted fewer tokens).

The schedule is a list of phases (layer K, stride S, until: fraction of the stage's optimizer
steps); a phase with `layer: null` does not compress. Outside training (evaluation, generation)
the `inference` phase applies (null: no compression). With `reference_layers`, layer indices are
those of a model that deep and are scaled to the host's depth (the paper's schemes on the tiny
model).

Positions: a pooled token takes its group's mean position. `positions: float16` does it as the
authors' code does (the positions cast to float16, averaged, the mean rounded to float16 and
truncated to an integer), `exact` keeps the float mean (RoPE takes fractional positions).

An image split by text (FALCON's crop indicators between its views, models/views.py) is pooled
span by span: a group never mixes two views.

A span whose length is not a multiple of S: its last, shorter group is averaged on its own, so
⌈L/S⌉ tokens remain and no visual token is dropped (the authors' `avg_pool1d` would drop the
remainder; with 576 tokens and S in {2, 4, 8, 16} there is none).

Compression ratio of a phase (N layers): N·L / ((N−K)·L/S + K·L) = N / ((N−K)/S + K); K=2, S=8
on 32 layers gives 557 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.compressors import register
from models.compressors.base import Compressor, ModelDims, Progress
from models.sequence import SequenceState


@dataclass(frozen=True)
class Phase:
    layer: int | None = 2  # K: pool before this decoder layer; -1 = before the LLM; None = off
    stride: int = 8  # S: kernel = stride of the 1-D pooling
    until: float = 1.0  # the phase lasts until this fraction of the stage's optimizer steps


@dataclass(frozen=True)
class LLaVoltaConfig:
    schedule: tuple[Phase, ...] = (Phase(),)
    inference: Phase | None = None  # the setting outside training; None = no compression
    positions: Literal["float16", "exact"] = "float16"
    reference_layers: int | None = None  # layer indices are given for a model this deep

    def __post_init__(self):  # params read back from JSON (an export) are plain mappings
        as_phase = lambda p: p if p is None or isinstance(p, Phase) else Phase(**p)  # noqa: E731
        object.__setattr__(self, "schedule", tuple(as_phase(p) for p in self.schedule))
        object.__setattr__(self, "inference", as_phase(self.inference))


def compression_ratio(layers: int, layer: int | None, stride: int) -> float:
    """Visual-token work of an uncompressed LLM over that of one pooling S× before layer K."""
    if layer is None:
        return 1.0
    kept = max(layer, 0)
    return layers / ((layers - kept) / stride + kept)


@register("llavolta")
class LLaVolta(Compressor):
    """Scheduled 1-D average pooling of the image span inside the LLM."""

    stage = "in_llm"
    Config = LLaVoltaConfig
    # the phase outside training, which no weight depends on: `vtc evaluate --setting
    # llavolta.inference={layer: 2, stride: 8}` measures a trained model under another one
    stage_settings = ("inference",)

    def __init__(self, config: LLaVoltaConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.phase_index: int | None = None  # the training phase in force (None: inference)

    @classmethod
    def check_config(cls, config: LLaVoltaConfig, dims: ModelDims):
        problems = []
        if not config.schedule:
            problems.append(("schedule", "give at least one phase"))
        ends = [p.until for p in config.schedule]
        if ends and (any(b <= a for a, b in zip(ends, ends[1:], strict=False)) or ends[-1] != 1.0):
            problems.append(("schedule", f"`until` must increase and end at 1.0, got {ends}"))
        if config.reference_layers is not None and config.reference_layers < 1:
            problems.append(("reference_layers", f"must be ≥ 1, got {config.reference_layers}"))
        depth = config.reference_layers or dims.llm_layers
        named = [(f"schedule[{i}]", p) for i, p in enumerate(config.schedule)]
        for key, phase in named + [("inference", config.inference)]:
            if phase is None:
                continue
            if phase.stride < 1:
                problems.append((f"{key}.stride", f"must be ≥ 1, got {phase.stride}"))
            if phase.layer is not None and not -1 <= phase.layer < depth:
                problems.append((f"{key}.layer", f"must be -1 (before the LLM) .. {depth - 1}, or null"))
        return problems

    def host_layer(self, layer: int | None) -> int | None:
        """A phase's layer index on this host (scaled from `reference_layers`); a layer ≥ 1 stays
        ≥ 1, so some layers still see every visual token."""
        reference = self.config.reference_layers
        if layer is None or layer <= 0 or reference is None:
            return layer
        return max(1, round(layer * self.dims.llm_layers / reference))

    def phase(self) -> Phase | None:
        """The phase in force: the training phase while training, else the inference one."""
        if self.training and self.phase_index is not None:
            return self.config.schedule[self.phase_index]
        return self.setting("inference")

    def set_progress(self, progress: Progress | None) -> dict[str, float]:
        super().set_progress(progress)
        if progress is None:
            self.phase_index = None
            return {}
        ends = [p.until for p in self.config.schedule]
        self.phase_index = next((i for i, end in enumerate(ends) if progress.fraction < end), len(ends) - 1)
        phase = self.config.schedule[self.phase_index]
        layer = self.host_layer(phase.layer)
        return {
            "phase": float(self.phase_index),
            "layer": float(layer if layer is not None else self.dims.llm_layers),
            "stride": float(phase.stride if layer is not None else 1),
            "compression_ratio": compression_ratio(self.dims.llm_layers, layer, phase.stride),
        }

    def describe(self, progress: Progress) -> list[str]:
        """One line per training phase: the steps it covers, K, S and its compression ratio."""
        lines, start, total_steps = [], 0, progress.total
        for i, phase in enumerate(self.config.schedule):
            end = round(phase.until * total_steps)
            layer = self.host_layer(phase.layer)
            what = "no compression" if layer is None else f"K={layer} S={phase.stride}"
            ratio = compression_ratio(self.dims.llm_layers, layer, phase.stride)
            lines.append(f"phase {i}: steps {start}..{end - 1}  {what}  CR {ratio:.0%}")
            start = end
        inference = self.config.inference
        layer = self.host_layer(inference.layer) if inference else None
        what = "no compression" if layer is None else f"K={layer} S={inference.stride}"
        lines.append(f"inference: {what}")
        return lines

    def before_layer(self, layer_idx: int, state: SequenceState) -> SequenceState:
        phase = self.phase()
        if phase is None:
            return state
        layer = self.host_layer(phase.layer)
        if layer is None or layer_idx != max(layer, 0) or not bool(state.visual_mask.any()):
            return state
        # K = -1: before the LLM, as if the projector had emitted the pooled tokens
        return state.pool_visual(phase.stride, "renumber" if layer < 0 else self.config.positions)
