"""FastV: attention-ranked pruning inside the LLM."""

import torch

from models.build import ComponentSpec, build
from models.llm import attention_rows
from tests.conftest import TEST_TINY


def batch(tok, image_id):
    rows = [[tok.bos_token_id, image_id, 10, 11, 12, 13], [tok.bos_token_id, image_id, 10]]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return ids, mask, torch.randn(2, 3, 64, 64)


def fastv_model(**params):
    return build("tiny", compressors=[ComponentSpec("fastv", params)], tiny=TEST_TINY, seed=4)


def test_keep_all_equals_the_uncompressed_model():
    base = build("tiny", tiny=TEST_TINY, seed=4)
    ids, mask, pixels = batch(base.tokenizer, base.model.image_token_id)
    with torch.no_grad():
        ref = base.model.eval()(ids, mask, pixels, return_logits=True).logits
        out = fastv_model(layer=0, tokens=64).model.eval()(ids, mask, pixels, return_logits=True).logits
    torch.testing.assert_close(out, ref)


def test_later_layers_see_exactly_k_visual_tokens():
    for query in ("last", "text"):
        built = fastv_model(layer=1, tokens=7, query=query)
        ids, mask, pixels = batch(built.tokenizer, built.model.image_token_id)
        with torch.no_grad():
            out = built.model.eval()(ids, mask, pixels)
        assert out.visual_tokens_in.tolist() == [64, 64]  # the LLM's input is whole
        assert out.state.num_visual.tolist() == [7, 7]  # pruned after layer 1


def test_recomputed_attention_matches_transformers_eager_weights():
    built = build("tiny", tiny=TEST_TINY, seed=4)
    model = built.model.eval()
    model.llm.body.config._attn_implementation = "eager"
    captured = {}
    layer = model.llm.body.layers[1]

    # Hooks return None, so the calls' inputs and outputs stay as they are.
    def keep_weights(module, inputs, output):
        captured["w"] = output[1]

    def keep_input(module, args, kwargs):
        captured["in"] = (args[0], kwargs)

    hook = layer.self_attn.register_forward_hook(keep_weights)
    layer.register_forward_pre_hook(keep_input, with_kwargs=True)
    ids, mask, pixels = batch(built.tokenizer, model.image_token_id)
    with torch.no_grad():
        model(ids, mask, pixels)
        hidden, kwargs = captured["in"]
        length = hidden.shape[1]
        every = torch.arange(length).expand(hidden.shape[0], length)
        ours = attention_rows(layer, hidden, kwargs["attention_mask"], kwargs["position_embeddings"], every)
        some = torch.tensor([[length - 1, 3], [2, 0]])
        rows = attention_rows(layer, hidden, kwargs["attention_mask"], kwargs["position_embeddings"], some)
    hook.remove()
    # Sample 0 is unpadded (every query has real keys): compare it whole.
    torch.testing.assert_close(ours[0], captured["w"][0].float(), rtol=1e-5, atol=1e-6)
    # A few rows are those rows of the whole matrix, and only they are built.
    assert rows.shape[2] == 2
    for b in range(2):
        torch.testing.assert_close(rows[b], ours[b][:, some[b]])


def pdrop_model(**params):
    return build("tiny", compressors=[ComponentSpec("pdrop", params)], tiny=TEST_TINY, seed=4)


def test_pyramid_drop_halves_the_visual_tokens_at_each_stage():
    built = pdrop_model(layers=[1, 2], keep=0.5)  # 3-layer test LLM: 64 → 32 (layer 1) → 16 (layer 2)
    ids, mask, pixels = batch(built.tokenizer, built.model.image_token_id)
    seen = []
    probe = built.model.llm.body.layers[2].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[1])
    )
    with torch.no_grad():
        out = built.model.eval()(ids, mask, pixels)
    probe.remove()
    assert out.visual_tokens_in.tolist() == [64, 64] and out.state.num_visual.tolist() == [16, 16]
    assert seen == [5 + 16]  # layer 2 runs on the longest sample's 5 text + 16 visual tokens


def test_pyramid_drop_keeping_everything_is_the_uncompressed_model():
    base = build("tiny", tiny=TEST_TINY, seed=4)
    ids, mask, pixels = batch(base.tokenizer, base.model.image_token_id)
    with torch.no_grad():
        ref = base.model.eval()(ids, mask, pixels, return_logits=True).logits
        out = pdrop_model(layers=[1, 2], keep=1.0).model.eval()(ids, mask, pixels, return_logits=True).logits
    torch.testing.assert_close(out, ref)
