"""Partial and repeated LLM runs: stop at a layer, continue from it, hide the image from a layer on."""

import torch

from models.build import build
from models.llm import KVState
from tests.conftest import TEST_TINY, ragged_prompts


def prompt_state(tokenizer, seed=0):
    model = build("tiny", tiny=TEST_TINY, seed=seed).model.eval()
    ids, mask = ragged_prompts(model, tokenizer)
    with torch.no_grad():
        state = model.prepare(ids, mask, torch.randn(2, 3, 64, 64))
    return model, state


@torch.no_grad()
def test_a_run_stopped_at_a_layer_continues_to_the_same_result(tokenizer):
    model, state = prompt_state(tokenizer)
    full = model.llm.run(state)
    for k in range(1, model.llm.num_layers):
        middle = model.llm.run(state, stop=k)
        assert not torch.allclose(middle.hidden, full.hidden)  # raw layer output, not normed
        torch.testing.assert_close(model.llm.run(middle, start=k).hidden, full.hidden)


@torch.no_grad()
def test_a_copy_with_the_image_hidden_from_layer_k_ignores_the_visual_tokens(tokenizer):
    """Two continuations of one state at layer k: with visual keys hidden, the text's outputs do
    not depend on what the visual tokens hold from layer k on; without, they do."""
    model, state = prompt_state(tokenizer)
    k = 1
    middle = model.llm.run(state, stop=k)
    noise = torch.randn_like(middle.hidden) * middle.visual_mask[..., None]
    noisy = middle.__class__(**{**middle.__dict__, "hidden": middle.hidden + noise})
    text = middle.attention_mask & ~middle.visual_mask
    seeing, seeing_noisy = (model.llm.run(m, start=k).hidden[text] for m in (middle, noisy))
    hidden, hidden_noisy = (
        model.llm.run(m.hide_visual_keys(), start=k).hidden[text] for m in (middle, noisy)
    )
    assert not torch.allclose(seeing, seeing_noisy)
    torch.testing.assert_close(hidden, hidden_noisy)
    assert not torch.allclose(hidden, seeing)


@torch.no_grad()
def test_hiding_cached_visual_keys_while_decoding(tokenizer):
    """A decision taken after prefill: kv.hide_visual_keys(k) makes layers k.. ignore the cached
    visual keys and values (corrupting them changes nothing), and only those layers."""
    model, state = prompt_state(tokenizer)

    def next_logits(k, corrupt_layer):
        kv = model.llm.new_kv(state)
        out = model.llm.run(state, kv=kv)
        token = model.llm.lm_head(out.hidden[:, -1]).argmax(-1)
        kv.hide_visual_keys(k)
        if corrupt_layer is not None:
            visual = kv.visual_masks[corrupt_layer]
            layer = kv.cache.layers[corrupt_layer]
            layer.keys[:, :, visual[0]] = torch.randn_like(layer.keys[:, :, visual[0]]) * 10
            layer.values[:, :, visual[0]] = torch.randn_like(layer.values[:, :, visual[0]]) * 10
        step = state.__class__(
            hidden=model.llm.embed(token[:, None]),
            attention_mask=torch.ones(2, 1, dtype=torch.bool),
            position_ids=kv.next_position[:, None],
            visual_mask=torch.zeros(2, 1, dtype=torch.bool),
            padding_side="right",
        )
        return model.llm.lm_head(model.llm.run(step, kv=kv).hidden[:, -1])

    assert isinstance(model.llm.new_kv(state), KVState)
    last = model.llm.num_layers - 1
    clean = next_logits(1, None)
    torch.testing.assert_close(next_logits(1, last), clean)  # a layer ≥ k: hidden, no effect
    assert not torch.allclose(next_logits(1, 0), clean)  # layer 0 < k still reads the image
