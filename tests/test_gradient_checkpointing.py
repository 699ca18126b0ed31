"""Gradient checkpointing of the LLM and the vision tower: the same gradients, fewer activations."""

import torch

from models.build import build
from tests.conftest import TEST_TINY
from train.recipe import load_recipe


def gradients(tokenizer, llm: bool, vision: bool) -> dict[str, torch.Tensor]:
    model = build("tiny", tiny=TEST_TINY, seed=0).model.train()
    model.set_gradient_checkpointing(llm=llm, vision=vision)
    torch.manual_seed(0)
    ids = torch.tensor([[tokenizer.bos_token_id, model.image_token_id, 10, 11, 12]] * 2)
    out = model(ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(2, 3, 64, 64), ids.clone())
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_layers_give_the_same_gradients(tokenizer):
    plain = gradients(tokenizer, False, False)
    assert any(n.startswith("vision.") for n in plain) and any(n.startswith("llm.") for n in plain)
    for llm, vision in ((True, False), (False, True), (True, True)):
        checkpointed = gradients(tokenizer, llm, vision)
        assert checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)


def test_checkpointing_recomputes_the_layers(tokenizer):
    """With it on, each layer runs twice per training step (forward, then in backward)."""
    model = build("tiny", tiny=TEST_TINY, seed=0).model.train()
    calls = []
    # (hooks on the layers' attention: HF checkpoints a layer's forward, inside its hooks)
    model.llm.body.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append("llm"))
    model.vision.layers()[0].self_attn.register_forward_pre_hook(lambda *_: calls.append("vision"))
    ids = torch.tensor([[tokenizer.bos_token_id, model.image_token_id, 10, 11]])
    mask, pixels = torch.ones_like(ids, dtype=torch.bool), torch.randn(1, 3, 64, 64)
    for llm, vision in ((False, False), (True, False), (False, True)):
        calls.clear()
        model.set_gradient_checkpointing(llm=llm, vision=vision)
        model(ids, mask, pixels, ids.clone()).loss.backward()
        assert (calls.count("llm"), calls.count("vision")) == (1 + llm, 1 + vision)
    model.set_gradient_checkpointing(llm=True, vision=True)
    with torch.no_grad():  # not when nothing needs a gradient (evaluation, generation)
        calls.clear()
        model(ids, mask, pixels)
        assert calls == ["vision", "llm"]


def test_the_7b_recipes_turn_it_on():
    for stage in ("pretrain", "finetune"):
        recipe = load_recipe(f"llava-1.5-7b/tokenpacker/{stage}", check_machine=False)
        assert recipe.trainer.gradient_checkpointing.llm and recipe.trainer.gradient_checkpointing.vision
