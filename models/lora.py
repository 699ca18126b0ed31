"""LoRA on a part of the model (the LLM or the vision tower), through peft.

Adapters are injected into the part's own modules (`inject_adapter_in_model`), so the part keeps
its class and its forward; `remove_lora` takes them out again, folding them into the base
weights or not, which gives the weights their plain HF names back.
"""

from __future__ import annotations

from contextlib import contextmanager

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_TARGETS = {
    "llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "vision": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
ADAPTER = "default"  # peft's adapter name


def unwrapped_name(name: str) -> str:
    """A weight's name as it was before LoRA wrapped its Linear, which keeps the weight under
    `.base_layer.` (`x.base_layer.weight` → `x.weight`; other names unchanged)."""
    return name.replace(".base_layer.", ".")


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def inject_lora(module: nn.Module, part: str, r: int, alpha: int, dropout: float) -> None:
    """Add LoRA adapters (rank r, scale alpha/r) to the attention and MLP linears of `part`."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS[part])
    inject_adapter_in_model(config, module)


@contextmanager
def adapters_off(root: nn.Module):
    """Run `root` as its base weights, every LoRA adapter under it bypassed, for the duration.
    peft's toggle also freezes the adapters; what each parameter's `requires_grad` was is put
    back afterwards, so a stage's freezing survives."""
    layers = [m for m in root.modules() if isinstance(m, LoraLayer)]
    wanted = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in wanted.items():
            param.requires_grad_(requires_grad)


def lora_settings(module: nn.Module) -> dict | None:
    """{r, alpha, dropout} of the adapters under `module` (None when it has none)."""
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            dropout = layer.lora_dropout[ADAPTER]
            return {
                "r": layer.r[ADAPTER],
                "alpha": layer.lora_alpha[ADAPTER],
                "dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            }
    return None


def remove_lora(root: nn.Module, merge: bool) -> int:
    """Put every adapter-wrapped linear under `root` back as its plain base module, folding the
    adapter into the base weight first when `merge`. Returns how many were removed."""
    removed = 0
    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, module.get_base_layer())
            removed += 1
    return removed
