"""Analytic prefill FLOPs of a LLaVA model — the one counter vtc reports.

Conventions (papers differ; these are vtc's):
- 2 FLOPs per multiply-add.
- Vision tower: patch embedding + every encoder layer the HF tower runs (all of them, although
  LLaVA reads layer -2): Q/K/V/O projections, attention's quadratic terms (QKᵀ and AV over the
  full n×n map), 2-matrix MLP. Norms, softmax, activations and biases are not counted.
  `vtc evaluate` counts the tower it runs with torch's counter instead (`counted_run`), which
  gives the same figure for a plain CLIP tower (tests/test_flops.py) and also counts what runs
  beyond it: an encoder component's additions and savings (FALCON's registers, ReAtten and
  register-only last layer). SigLIP's pooling head is not run (`VisionTower` skips it: LLaVA
  reads a hidden state), so it is not counted.
- Projector / compressor modules: counted by `torch.utils.flop_counter` on meta tensors (exact
  for whatever the component computes, no weights needed).
- LLM: per layer with that layer's own token count (in-LLM compressors shorten later layers):
  Q/K/V/O projections (K/V sized by the KV heads), attention's quadratic terms over the full n×n
  map (causal masking is not subtracted), the 3-matrix SwiGLU MLP. The lm_head is counted once,
  for the last position: prefill produces the next token's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models.vision import prefix_tokens


@dataclass(frozen=True)
class PrefillFlops:
    vision: float
    projector: float
    llm: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    def as_dict(self) -> dict:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm, "total": self.total}


def vision_flops(
    config, patches: int | None = None, extra_tokens: int = 0, last_layer_rows: int | None = None
) -> float:
    """One image through an HF CLIP/SigLIP vision config (all layers); `patches`: when the image
    enters at another size than the config's (default: (image_size / patch_size)²);
    `extra_tokens`: tokens appended after the embeddings (e.g. FALCON's registers), which run
    through every layer but are not patch-embedded; `last_layer_rows`: the last layer computes
    only this many rows' outputs (their Q, attention, O and MLP; K and V of every token), as
    for a component that reads only its own tokens of that layer."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = patches or (config.image_size // config.patch_size) ** 2
    n = patches + prefix_tokens(config) + extra_tokens  # + CLS (SigLIP has none)

    def layer_macs(rows: int) -> int:
        return 2 * n * d * d + 2 * rows * d * d + 2 * rows * n * d + 2 * rows * d * ff

    macs = patches * 3 * config.patch_size**2 * d  # patch embedding
    macs += (layers - 1) * layer_macs(n) + layer_macs(n if last_layer_rows is None else last_layer_rows)
    return 2.0 * macs


def llm_flops(config, layer_tokens: list[int]) -> float:
    """Decoder layers with `layer_tokens[l]` tokens at layer l, plus the last position's lm_head."""
    d, ff = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    macs = 0
    for n in layer_tokens:
        macs += n * d * (heads * head_dim) * 2  # Q and O
        macs += n * d * (kv_heads * head_dim) * 2  # K and V
        macs += 2 * n * n * heads * head_dim  # QKᵀ and AV
        macs += 3 * n * d * ff  # SwiGLU: gate, up, down
    macs += d * config.vocab_size  # lm_head, last position
    return 2.0 * macs


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes: the counter passes shapes, not tensors


# torch's counter knows the CUDA attention kernels but not the one sdpa picks on CPU, which it
# would otherwise count as zero
_UNREGISTERED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def counted_run(fn, *inputs) -> tuple[float, Any]:
    """fn(*inputs) without gradients, and its FLOPs counted by torch's FlopCounterMode (2 per
    multiply-add): matmuls, convolutions and attention kernels, as the analytic counter."""
    with FlopCounterMode(display=False, custom_mapping=_UNREGISTERED) as counter, torch.no_grad():
        output = fn(*inputs)
    return float(counter.get_total_flops()), output


def module_flops(fn, *inputs) -> float:
    """FLOPs of fn(*inputs) (a module or any callable) counted by torch's FlopCounterMode."""
    return counted_run(fn, *inputs)[0]


def prefill_flops(
    llava_config,
    text_tokens: int,
    visual_tokens: int,
    layer_tokens: list[int] | None = None,
    projector_flops: float = 0.0,
    images: int = 1,
    vision_patches: int | None = None,
    vision: float | None = None,
) -> PrefillFlops:
    """Prefill FLOPs of one sample: `images` images, `visual_tokens` entering the LLM, `text_tokens`
    of text. `layer_tokens` overrides the per-layer sequence length (in-LLM compressors);
    `vision_patches` the patches per image of a tower fed a smaller image (down-sampling);
    `vision` the tower's FLOPs for all images, counted elsewhere, instead of the analytic ones."""
    text = llava_config.text_config
    if layer_tokens is None:
        layer_tokens = [text_tokens + visual_tokens] * text.num_hidden_layers
    if len(layer_tokens) != text.num_hidden_layers:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries for {text.num_hidden_layers} layers")
    if vision is None:
        vision = images * vision_flops(llava_config.vision_config, vision_patches)
    return PrefillFlops(
        vision,
        images * projector_flops,
        llm_flops(text, layer_tokens),
    )
