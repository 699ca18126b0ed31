"""Per-stage freeze policy, LoRA injection and the parameter table."""

import dataclasses

from models.build import build
from tests.conftest import TEST_TINY
from train.freeze import apply_stage, format_table
from train.recipe import Freeze, LoraRecipe, Stage


def stage(**train):
    return Stage(name="s", steps=1, train=Freeze(**train), lora=LoraRecipe(r=4, alpha=8, dropout=0.0))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_policy_sets_requires_grad_per_part():
    model = build("tiny", tiny=TEST_TINY).model
    rows = apply_stage(model, stage(vision="frozen", projector="full", llm="frozen"))
    names = trainable_names(model)
    assert names and all(n.startswith("projector.") for n in names)
    table = format_table("s", rows).splitlines()
    tags = {line.split()[0]: line.split()[2] for line in table[2:]}
    # the tiny model has no compressor: that part is shown as absent, not as frozen
    assert tags == {
        "vision": "[Frozen]",
        "projector": "[TRAINABLE]",
        "compressors": "(none)",
        "llm": "[Frozen]",
    }


def test_lora_trains_only_adapters_and_persists_across_stages():
    model = build("tiny", tiny=TEST_TINY).model
    apply_stage(model, stage(llm="lora", projector="frozen"))
    names = trainable_names(model)
    assert names and all("lora_" in n and n.startswith("llm.") for n in names)
    apply_stage(model, stage(llm="lora", projector="full"))  # no second injection
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == len([n for n in names if "lora_A" in n])


def test_lora_adapters_start_as_identity():
    model = build("tiny", tiny=TEST_TINY).model.eval()
    import torch

    ids = torch.tensor([[1, 4, 10, 11]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(ids, mask, pixels, return_logits=True).logits
        apply_stage(model, stage(llm="lora"))
        after = model(ids, mask, pixels, return_logits=True).logits
    torch.testing.assert_close(before, after)


def test_vision_parameters_after_the_feature_layer_never_train():
    model = build("tiny", tiny=TEST_TINY).model
    for mode in ("full", "lora"):
        apply_stage(model, stage(vision=mode, projector="frozen"))
        names = trainable_names(model)
        last = TEST_TINY.vision_layers - 1  # LLaVA reads layer -2: the last layer is unused
        assert any(n.startswith("vision.") for n in names)
        assert not any(
            f"layers.{last}." in n or "post_layernorm" in n for n in names if n.startswith("vision.")
        )


def test_stage_is_a_frozen_dataclass():
    assert dataclasses.is_dataclass(Stage) and Stage.__dataclass_params__.frozen
