"""FALCON: visual registers inside the vision tower (arXiv 2501.16297).

**ReCompact.** M learnable registers (1, M, Dv), shared by every view, are appended after each
view's patch tokens (after CLS on CLIP) once the tower has added its position embeddings, so
registers get none; each view's registers add a crop embedding 0.5·(E_row[r] + E_col[c]) (two
`Embedding(anchor_max + 1, Dv)`; a whole image or thumbnail uses index anchor_max). The tower
runs as usual and only the M register outputs of its **last** layer leave it (after
`post_layernorm` on SigLIP, raw on CLIP): 576 → 64 tokens per view at M = 64 (9×), M = 36 gives
16×. The projector (LLaVA's MLP) maps them to the LLM. As nothing reads the patches' outputs of
the last layer, that layer computes the registers' rows only (`last_layer_rows`; each register
still attends to every token), which saves most of one layer of the tower.

**ReAtten.** In every encoder layer, after self-attention and before the residual add, the
register outputs of all views of one image are gathered (padded, with a key-padding mask, so a
batch mixes images with different view counts), attend to each other through an extra attention
module of the layer's shape — initialised as a copy of that layer's self-attention when the
component is attached — and the result is added to the registers only. Views of different
images never see each other.

Nothing in transformers is patched: registers enter through a forward hook on this model's
embeddings and ReAtten through per-call hooks on its layers' attention (`models/vision.py`),
so another tower in the process is untouched and the tower keeps its attention kernel.

**Register distillation** (vtc's warm start, not in the paper): in a stage whose objective has
`aux` (`aux` or `lm+aux`), the first a·b registers of each view also learn to equal the host's
own visual features of that view (LLaVA's feature layer, from a plain no-gradient pass of the
tower with any LoRA adapters off) average-pooled to an a × b map (a = ⌊√M⌋, b = a + 1 when
a·(a+1) ≤ M else a: M = 64 → 8 × 8, M = 7 → 2 × 3 and the seventh register free); loss
`register_distill` = MSE / the target's variance. Why: the authors learn the registers from
captions through a frozen LLM, on 558K images; on the tiny base that stage leaves them almost
constant (their outputs vary across images a tenth as much as the patches' do) and the
instruction stage then answers at the answer prior, with the tower frozen or trained. Pooled
host features are what the host's projector already reads. A frozen tiny tower cannot make a
register gather one region (its attention is not positional enough), so the distilling stage
trains the tower with LoRA, and the plain pass with the adapters off stays a fixed teacher
(with `vision: full` the teacher would move with the tower: measured on the tiny base, the
targets' variance went from 3.7 to 30.7 in 50 steps).

`reatten_init: copy-zero-out` (vtc's option) zeroes the copy's output projection: a stage that
switches ReAtten on after one without it then starts from the same outputs, instead of adding a
second attention update of full size to every layer's registers.

`reatten` can be switched per training stage (`stages[i].components: {falcon: {reatten:
false}}`), as the authors train stage 1 without it; outside training the recipe's value holds.
`reatten_ramp: [start, end]` (vtc's option, per stage too) phases ReAtten in within a stage: its
added output is scaled by 0 before `start` (a fraction of the stage's optimizer steps), rising
linearly to 1 at `end` (start = end switches it on at once; start < 1, since a ramp from 1
would never train the ReAtten it then tests with). The stage then trains without
ReAtten until the other weights have learnt what they can alone, with the same learning-rate
schedule and data order as a stage without it; outside training ReAtten counts in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor, ModelDims, Progress
from models.gather import as_call, gathered
from models.views import ViewLayout


@dataclass(frozen=True)
class FalconConfig:
    registers: int = 64  # M per view: 576 → 64 on CLIP-L/336 (9×); 36 → 16×
    anchor_max: int = 16  # crop rows/columns 0..anchor_max-1 get their own embedding
    reatten: bool = True  # register interactive attention across the views of an image
    # "copy": each layer's ReAtten starts as a copy of its self-attention (the authors');
    # "copy-zero-out": the same with the output projection zeroed, so switching ReAtten on
    # changes nothing until it has learned something (vtc's option, not in the paper)
    reatten_init: Literal["copy", "copy-zero-out"] = "copy"
    # (start, end) fractions of a training stage's optimizer steps: ReAtten's output is scaled
    # from 0 before `start` to 1 at `end`, linearly; None = in full from the first step
    reatten_ramp: tuple[float, float] | None = None
    # std of the registers' and crop embeddings' normal start; the authors' code draws both from
    # N(0, 1) (`torch.randn`, an `Embedding`'s default), vtc's tiny recipes from N(0, 0.02)
    init_std: float = 0.02

    def __post_init__(self):  # params read back from JSON (an export) are plain lists
        if self.reatten_ramp is not None:
            object.__setattr__(self, "reatten_ramp", tuple(self.reatten_ramp))


class RegisterAttention(nn.Module):
    """Multi-head attention among the registers of each image's views: (I, T, Dv) with a key
    mask (I, T) → (I, T, Dv). The projections have the names and shapes of an HF CLIP / SigLIP
    self-attention, so they start as a copy of one."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        split = lambda t: t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def ramp_value(fraction: float, start: float, end: float) -> float:
    """0 before `start`, 1 from `end` on, linear between (a step at start = end)."""
    if fraction >= end:
        return 1.0
    if fraction < start:
        return 0.0
    return (fraction - start) / (end - start)


def distill_map(registers: int) -> tuple[int, int]:
    """(a, b): the most square map of at most `registers` cells, b ∈ {a, a + 1}."""
    a = math.isqrt(registers)
    return (a, a + 1) if a * (a + 1) <= registers else (a, a)


def pooled_targets(plain: torch.Tensor, registers: int) -> torch.Tensor:
    """(V, N, Dv) square patch maps → (V, a·b, Dv) averages over an a × b grid of regions
    (raster order; adaptive pooling, so regions of a side that a does not divide overlap)."""
    views, count, width = plain.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"falcon distill: {count} patches per view do not form a square map")
    maps = plain.transpose(1, 2).reshape(views, width, side, side)
    return F.adaptive_avg_pool2d(maps.float(), distill_map(registers)).flatten(2).transpose(1, 2)


@register("falcon")
class Falcon(Compressor):
    """Registers in the ViT: (V, P+N, Dv) embeddings → (V, M, Dv) register outputs per view."""

    stage = "encoder"
    Config = FalconConfig
    acts_in_vision_layers = True
    reads_last_vision_layer = True
    stage_settings = ("reatten", "reatten_ramp")  # behaviour a stage may set (no weight changes shape)
    aux_losses = ("register_distill",)  # vtc's warm start, in stages whose objective has `aux`
    sparse_gradients = True  # a stage without ReAtten leaves its modules without gradient

    def __init__(self, config: FalconConfig, dims: ModelDims):
        super().__init__(config, dims)
        width = dims.vision_width
        self.registers = nn.Parameter(torch.randn(1, config.registers, width) * config.init_std)
        self.crop_row = nn.Embedding(config.anchor_max + 1, width)
        self.crop_col = nn.Embedding(config.anchor_max + 1, width)
        for embedding in (self.crop_row, self.crop_col):
            nn.init.normal_(embedding.weight, std=config.init_std)
        self.reatten = nn.ModuleList(
            RegisterAttention(width, dims.vision_heads) for _ in range(dims.vision_layers)
        )

    @classmethod
    def check_config(cls, config: FalconConfig, dims: ModelDims):
        problems = []
        if config.registers < 1:
            problems.append(("registers", f"must be at least 1, got {config.registers}"))
        if config.anchor_max < 1:
            problems.append(("anchor_max", f"must be at least 1, got {config.anchor_max}"))
        if not config.init_std > 0:
            problems.append(("init_std", f"must be > 0, got {config.init_std}"))
        ramp = config.reatten_ramp
        if ramp is not None and not (len(ramp) == 2 and 0 <= ramp[0] <= ramp[1] <= 1 and ramp[0] < 1):
            # a ramp from 1 would train without ReAtten, yet test with it untrained at full scale
            problems.append(
                ("reatten_ramp", f"give [start, end] with 0 ≤ start < 1, start ≤ end ≤ 1, got {list(ramp)}")
            )
        return problems

    def output_tokens(self, input_tokens: int) -> int:
        return self.config.registers

    def output_grid(self, grid: int | None) -> int | None:
        return None  # registers are a set, not a map: views are laid out one after another

    def attach(self, host) -> None:
        """Start every layer's ReAtten as a copy of that layer's self-attention (with
        `reatten_init: copy-zero-out`, its output projection then zeroed)."""
        super().attach(host)
        layers = host.vision.layers()
        with torch.no_grad():
            for reatten, layer in zip(self.reatten, layers, strict=True):
                sources = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
                params = [p for s in sources for p in s.parameters()]
                with gathered(params + list(reatten.parameters()), modify=True):
                    for source, name in zip(sources, ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True):
                        getattr(reatten, name).load_state_dict(source.state_dict())
                    if self.config.reatten_init == "copy-zero-out":
                        # the registers' stream is unchanged when ReAtten switches on (a stage
                        # after one without it) and the output learns from there, as LoRA's B
                        nn.init.zeros_(reatten.out_proj.weight)
                        nn.init.zeros_(reatten.out_proj.bias)

    def reatten_on(self) -> bool:
        return bool(self.setting("reatten"))

    def reatten_scale(self) -> float:
        """What ReAtten's output is multiplied by now: 0 when off, 1 outside training or without
        a ramp, else where the stage's progress stands on `reatten_ramp`."""
        if not self.reatten_on():
            return 0.0
        ramp, progress = self.setting("reatten_ramp"), getattr(self, "progress", None)
        if ramp is None or progress is None:
            return 1.0
        return ramp_value(progress.fraction, *ramp)

    def describe(self, progress: Progress) -> list[str]:
        """The stage's ReAtten: off, on, or the optimizer steps its ramp covers."""
        if not self.setting("reatten", progress):
            return ["ReAtten off"]
        ramp = self.setting("reatten_ramp", progress)
        if ramp is None:
            return ["ReAtten on"]
        # the first steps whose fraction (step / total) reaches the ramp's start and end
        start, end = (math.ceil(f * progress.total - 1e-9) for f in ramp)
        return [
            f"ReAtten ramped in: 0 until step {start}, linear to full at step {end} (of {progress.total})"
        ]

    def set_progress(self, progress):
        super().set_progress(progress)
        if progress is None or self.setting("reatten_ramp") is None:
            return {}
        return {"reatten_scale": self.reatten_scale()}

    def crop_embedding(self, views: ViewLayout) -> torch.Tensor:
        """(V, Dv): 0.5·(E_row[r] + E_col[c]); a whole image or thumbnail uses anchor_max."""
        anchor = self.config.anchor_max
        if bool((views.row >= anchor).any() or (views.col >= anchor).any()):
            raise ValueError(
                f"falcon: a crop at row/column ≥ anchor_max {anchor}; raise falcon.anchor_max to "
                f"the largest grid side of model.views"
            )
        row = torch.where(views.is_crop, views.row, anchor)
        col = torch.where(views.is_crop, views.col, anchor)
        return 0.5 * (self.crop_row(row) + self.crop_col(col))

    def extend_embeddings(self, embeddings: torch.Tensor, views: ViewLayout) -> torch.Tensor:
        """(V, P+N, Dv) after the tower's position embeddings → (V, P+N+M, Dv)."""
        self._groups = self.group_views(views)  # once per forward, for every layer's ReAtten
        registers = as_call(self, self.view_registers, views)  # the tower's hook is no call of ours
        return torch.cat([embeddings, registers.to(embeddings.dtype)], dim=1)

    def view_registers(self, views: ViewLayout) -> torch.Tensor:
        """Each view's registers with its crop embedding added: (V, M, Dv)."""
        return self.registers + self.crop_embedding(views)[:, None]

    def group_views(self, views: ViewLayout) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Where each view's registers go in a padded (images, most views, M) layout: (image (V,),
        slot (V,), most, key mask (images, most·M))."""
        images = int(views.image.max()) + 1
        counts = torch.bincount(views.image, minlength=images)
        first = torch.cumsum(counts, 0) - counts  # each image's first view (views are image-major)
        slot = torch.arange(len(views), device=counts.device) - first[views.image]
        most = int(counts.max())
        valid = torch.arange(most, device=counts.device)[None] < counts[:, None]
        return views.image, slot, most, valid.repeat_interleave(self.config.registers, 1)

    def after_vision_attention(self, layer_idx, layer_input, attention_output, views):
        """Registers of one image's views attend to each other; (V, T, Dv) → (V, T, Dv)."""
        scale = self.reatten_scale()
        if scale == 0.0:  # off, or not yet ramped in: nothing to compute (and no gradient)
            return attention_output
        m = self.config.registers
        image, slot, most, valid = self._groups
        registers = attention_output[:, -m:]  # (V, M, Dv)
        padded = registers.new_zeros(valid.shape[0], most, m, registers.shape[-1])
        padded[image, slot] = registers
        mixed = self.reatten[layer_idx](padded.flatten(1, 2), valid).view_as(padded)[image, slot]
        return torch.cat([attention_output[:, :-m], registers + scale * mixed], dim=1)

    def last_layer_rows(self) -> int:
        return self.config.registers  # only the registers leave the tower

    def wants_plain_features(self) -> bool:
        return "register_distill" in self.training_terms() and torch.is_grad_enabled()

    def select(self, hidden_states, num_patches, views, plain=None):
        """The last layer's register outputs (V, M, Dv); SigLIP's post-norm applied as the
        tower's own output would be. `plain` (V, N, Dv), when distilling: the host's own
        features of the views, the target of the first a·b registers."""
        registers = hidden_states[-1][:, -self.config.registers :]
        tower = getattr(self.host.vision.model, "vision_model", self.host.vision.model)
        if self.dims.prefix_tokens == 0 and hasattr(tower, "post_layernorm"):  # SigLIP
            registers = tower.post_layernorm(registers)
        if plain is not None:
            target = pooled_targets(plain, self.config.registers).to(registers.dtype)
            student = registers[:, : target.shape[1]]
            self.add_loss("register_distill", F.mse_loss(student, target) / target.var().clamp_min(1e-6))
        return registers

    def parameter_summary(self) -> dict[str, int]:
        """Parameter counts by part (printed by the 7B shape test and the README)."""
        return {
            "registers": self.registers.numel(),
            "crop_embeddings": self.crop_row.weight.numel() + self.crop_col.weight.numel(),
            "reatten_per_layer": sum(p.numel() for p in self.reatten[0].parameters()),
            "reatten_layers": len(self.reatten),
        }
