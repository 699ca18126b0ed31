"""Per-stage freeze policy: each part of the model is `frozen`, `full` or `lora` (peft).

Parts: vision (the tower), projector, compressors, llm. LoRA adapters are injected with peft
into the part's attention and MLP linears the first time a stage asks for them, and stay (their
weights are trainables of every later stage that keeps that part in `lora`).
"""

from __future__ import annotations

from models.llava import VtcLlava
from models.lora import has_lora, inject_lora
from train.recipe import Stage


def apply_stage(model: VtcLlava, stage: Stage) -> list[tuple[str, str, int, int]]:
    """Set requires_grad per the stage's policy (injecting LoRA where asked).
    Returns rows (part, mode, trainable params, frozen params)."""
    rows = []
    for part, module in model.parts().items():
        mode = getattr(stage.train, part)
        if mode == "lora" and not has_lora(module):
            inject_lora(module, part, stage.lora.r, stage.lora.alpha, stage.lora.dropout)
        through_last = any(c.reads_last_vision_layer for c in model.components())
        never = module.unused_prefixes(through_last) if part == "vision" else ()
        for name, param in module.named_parameters():
            is_lora = "lora_" in name
            wanted = mode == "full" and not is_lora or mode == "lora" and is_lora
            param.requires_grad_(wanted and not name.startswith(never))
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        rows.append((part, mode, trainable, frozen))
    return rows


def format_table(stage_name: str, rows) -> str:
    lines = [
        f"stage {stage_name!r}: parameters",
        f"  {'part':<12}{'mode':<8}{'':>12}{'trainable':>12}{'frozen':>12}",
    ]
    for part, mode, trainable, frozen in rows:
        # a part the model does not have (no compressor, say) is neither trainable nor frozen
        tag = "[TRAINABLE]" if trainable else "[Frozen]" if frozen else "(none)"
        lines.append(f"  {part:<12}{mode:<8}{tag:>12}{_millions(trainable):>12}{_millions(frozen):>12}")
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n else "0"
