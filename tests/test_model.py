"""Model assembly: llava-hf parity, ragged merge, hook points at every stage, cached generation."""

import pytest
import torch

import tests.components  # noqa: F401  (registers the test components)
from models.build import ComponentSpec, build, floating_buffers, save_as_llava_hf, to_precision
from models.sequence import SequenceState
from tests.conftest import TEST_TINY, assert_generation_matches_forwards
from train.recipe import REPO_ROOT

torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny():
    return build("tiny", tiny=TEST_TINY)


def prompt(tok, image_id, words):
    return [tok.bos_token_id] + [image_id] + tok(words, add_special_tokens=False).input_ids


def pad(rows, pad_id=0):
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def test_logits_match_transformers_llava(tmp_path, tiny):
    """A llava-hf checkpoint loaded by vtc gives transformers' logits for the same input."""
    save_as_llava_hf(tiny, tmp_path)
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    vtc = build(str(tmp_path)).model.eval()
    tok, img = tiny.tokenizer, vtc.image_token_id
    ids = prompt(tok, img, "What colour is the dot ?")
    pixels = torch.randn(1, 3, 64, 64)
    expanded = ids[:1] + [img] * vtc.vision.num_patches + ids[2:]  # transformers wants one id per patch
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits
        ours = vtc(
            torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), pixels, return_logits=True
        ).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ragged_batch_equals_one_by_one(tiny):
    model, tok = tiny.model.eval(), tiny.tokenizer
    rows = [
        prompt(tok, model.image_token_id, "What colour is the dot ?"),
        prompt(tok, model.image_token_id, "red"),
    ]
    ids, mask = pad(rows)
    pixels = torch.randn(2, 3, 64, 64)
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        batched = model(ids, mask, pixels, labels, return_logits=True)
        for b, row in enumerate(rows):
            single = model(
                torch.tensor([row]),
                torch.ones(1, len(row), dtype=torch.bool),
                pixels[b : b + 1],
                return_logits=True,
            ).logits[0]
            n = single.shape[0]
            torch.testing.assert_close(batched.logits[b, :n], single, rtol=1e-4, atol=1e-5)
    assert batched.visual_tokens_in.tolist() == [64, 64]
    assert (batched.state.labels[batched.state.visual_mask] == -100).all()


def test_merge_errors_on_image_count_mismatch(tiny):
    model, tok = tiny.model, tiny.tokenizer
    ids, mask = pad([prompt(tok, model.image_token_id, "red")])
    with pytest.raises(ValueError, match="more <image> tokens than images"):
        model.prepare(ids, mask, None)
    with pytest.raises(ValueError, match="2 images given"):
        model.prepare(ids, mask, torch.randn(2, 3, 64, 64))


HOOKS = [
    ("encoder", [ComponentSpec("test_registers", {"count": 4})], 4),
    ("pre_llm", [ComponentSpec("test_keep_first", {"keep": 5})], 5),
    ("in_llm", [ComponentSpec("test_drop_visual_at", {"layer": 1})], 64),
    ("hide_keys", [ComponentSpec("test_hide_visual_at", {"layer": 2})], 64),
    (
        "stacked",
        [ComponentSpec("test_keep_first", {"keep": 7}), ComponentSpec("test_drop_visual_at", {"layer": 2})],
        7,
    ),
    ("avgpool2d", [ComponentSpec("avgpool2d", {"stride": 2})], 16),
    ("fastv", [ComponentSpec("fastv", {"layer": 0, "tokens": 5})], 64),
    ("divprune", [ComponentSpec("divprune", {"tokens": 6})], 6),
    ("pdrop", [ComponentSpec("pdrop", {"layers": [1, 2], "keep": 0.5})], 64),
]


# Prompt-dependent in-LLM pruning (FastV, PyramidDrop) chooses its tokens once, at prefill, ranked by the
# prompt's last token; a full forward over prompt + generated tokens ranks by another token, so
# only the first generated token is the same computation.
SAME_STEPS = {"fastv": 1, "pdrop": 1}


@pytest.mark.parametrize("name,components,visual_in", HOOKS, ids=[h[0] for h in HOOKS])
def test_hook_points_generation_matches_full_forward(tiny, name, components, visual_in):
    """At every hook point: cached greedy generation over a ragged batch equals the argmax of a
    full forward at every step (see SAME_STEPS), and the LLM receives the expected number of
    visual tokens."""
    model = build("tiny", compressors=components, tiny=TEST_TINY).model.eval()
    tok, img = tiny.tokenizer, model.image_token_id
    rows = [prompt(tok, img, "What colour is the dot ?"), prompt(tok, img, "Is there a red circle ?")[:5]]
    ids, mask = pad(rows)
    pixels = torch.randn(2, 3, 64, 64)
    generated, visual, _ = model.generate(ids, mask, pixels, max_new_tokens=4)
    assert visual.tolist() == [visual_in, visual_in]
    for b, row in enumerate(rows):
        assert_generation_matches_forwards(
            model, row, pixels[b : b + 1], generated[b], SAME_STEPS.get(name, 4)
        )


def test_generation_stops_at_any_of_several_stop_ids(tiny):
    """A chat template ends answers with its own end-of-turn token besides eos: each row stops
    at the first of either, and the rest of the row is the first stop id."""
    model = build("tiny", tiny=TEST_TINY).model.eval()
    tok, img = tiny.tokenizer, model.image_token_id
    rows = [prompt(tok, img, "What colour is the dot ?"), prompt(tok, img, "Is there a red circle ?")]
    ids, mask = pad(rows)
    pixels = torch.randn(2, 3, 64, 64)
    free, _, _ = model.generate(ids, mask, pixels, max_new_tokens=4)
    second = int(free[0, 1])  # row 0's second token becomes a stop id: row 0 stops there
    stops = [tok.eos_token_id, second]
    stopped, _, _ = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=stops)
    for row in range(2):
        cut = next((i for i, t in enumerate(free[row].tolist()) if t in stops), 3)
        assert stopped[row, : cut + 1].tolist() == free[row, : cut + 1].tolist()
        assert set(stopped[row, cut + 1 :].tolist()) <= {tok.eos_token_id}
    assert stopped[0, 1] == second


def test_in_llm_drop_removes_the_image_from_later_layers(tiny):
    """Dropping every visual token before layer 0 makes the answer independent of the image;
    dropping before layer 1 does not (layer 0 has already mixed the image into the text)."""
    tok = tiny.tokenizer
    outputs = {}
    for layer in (0, 1):
        model = build(
            "tiny",
            compressors=[ComponentSpec("test_drop_visual_at", {"layer": layer})],
            tiny=TEST_TINY,
            seed=3,
        ).model.eval()
        ids, mask = pad([prompt(tok, model.image_token_id, "What colour is the dot ?")])
        with torch.no_grad():
            outputs[layer] = [
                model(ids, mask, torch.randn(1, 3, 64, 64), return_logits=True).logits[0, -1]
                for _ in range(2)
            ]
    torch.testing.assert_close(outputs[0][0], outputs[0][1])
    assert (outputs[1][0] - outputs[1][1]).abs().max() > 1e-4


def test_state_keep_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for side in ("right", "left"):
        state = SequenceState(
            hidden, mask, torch.arange(5).expand(2, 5), torch.zeros(2, 5, dtype=torch.bool), padding_side=side
        )
        keep = torch.tensor([[1, 0, 1, 1, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
        out = state.keep(keep)
        assert out.attention_mask.sum(1).tolist() == [3, 2]
        got = [out.hidden[b, out.attention_mask[b], 0].tolist() for b in range(2)]
        assert got == [[0.0, 2.0, 3.0], [7.0, 9.0]]
        assert out.position_ids[0, out.attention_mask[0]].tolist() == [0, 2, 3]
        assert bool(out.attention_mask[1, -1 if side == "right" else 0]) is False


def test_replace_visual_average_positions():
    hidden = torch.zeros(1, 6, 2)
    vis = torch.tensor([[False, True, True, True, True, False]])
    state = SequenceState(hidden, torch.ones(1, 6, dtype=torch.bool), torch.arange(6)[None], vis)
    out = state.replace_visual(torch.ones(1, 2, 2), positions="average")
    assert out.position_ids.tolist() == [[0.0, 1.5, 3.5, 5.0]]
    assert out.visual_mask.tolist() == [[False, True, True, False]]


def test_replace_visual_span_by_span_when_text_splits_the_image():
    """[t v v t v v v t] (text inside the image, as crop indicators make): one replacement per
    span of visual tokens, text kept in place."""
    hidden = torch.arange(8.0)[None, :, None].expand(1, 8, 2)
    vis = torch.tensor([[False, True, True, False, True, True, True, False]])
    state = SequenceState(hidden, torch.ones(1, 8, dtype=torch.bool), torch.arange(8)[None], vis)
    assert state.visual_spans(0) == [(1, 3), (4, 7)]
    new = [[torch.full((1, 2), -1.0), torch.full((2, 2), -2.0)]]
    out = state.replace_visual(new, positions="average")
    assert out.hidden[0, :, 0].tolist() == [0.0, -1.0, 3.0, -2.0, -2.0, 7.0]
    assert out.position_ids.tolist() == [[0.0, 1.5, 3.0, 4.5, 6.0, 7.0]]
    assert out.visual_mask.tolist() == [[False, True, False, True, True, False]]
    assert state.replace_visual(new).position_ids.tolist() == [list(range(6))]
    given = state.replace_visual(new, positions=[torch.tensor([9, 8, 7])])
    assert given.position_ids.tolist() == [[0, 9, 3, 8, 7, 7]]
    with pytest.raises(ValueError, match="2 spans of visual tokens"):
        state.replace_visual(torch.ones(1, 3, 2))


def per_span_pooling(state: SequenceState, stride: int, positions: str) -> SequenceState:
    """`pool_visual` spelled out sample by sample through `replace_visual` (the reference)."""
    spans, given = [], []
    for b in range(state.hidden.shape[0]):
        pooled, where = [], []
        for start, end in state.visual_spans(b):
            tokens, pos = state.hidden[b, start:end], state.position_ids[b, start:end]
            groups = torch.arange(end - start) // stride
            size = torch.bincount(groups).float()
            pooled.append(
                torch.zeros(len(size), tokens.shape[1]).index_add(0, groups, tokens) / size[:, None]
            )
            source = pos.half().float() if positions == "float16" else pos.float()
            mean = torch.zeros(len(size)).index_add(0, groups, source) / size
            where.append(mean.half().long() if positions == "float16" else mean)
        spans.append(pooled)
        given.append(torch.cat(where) if where else state.position_ids[b, :0])
    return state.replace_visual(spans, positions="renumber" if positions == "renumber" else given)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("positions", ["exact", "float16", "renumber"])
def test_pool_visual_equals_pooling_each_span_on_its_own(side, positions):
    """Ragged samples with one image, an image split by text (crop indicators), and none;
    spans the stride does not divide; labels and roles carried along. Equal to the bit."""
    from data import IGNORE_INDEX
    from models.sequence import roles_of

    generator = torch.Generator().manual_seed(0)
    layouts = [  # per sample: visual mask of its real tokens
        [0, 0] + [1] * 9 + [0, 0, 0],
        [0] + [1] * 4 + [0] + [1] * 7 + [0],
        [0, 0, 0],
        [1] * 8 + [0, 0],
    ]
    length = max(map(len, layouts))
    state = SequenceState(
        torch.zeros(4, length, 3),
        torch.zeros(4, length, dtype=torch.bool),
        torch.zeros(4, length, dtype=torch.long),
        torch.zeros(4, length, dtype=torch.bool),
        torch.full((4, length), IGNORE_INDEX),
        padding_side=side,
        role=torch.zeros(4, length, dtype=torch.int8),
    )
    for b, layout in enumerate(layouts):
        n = len(layout)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        visual = torch.tensor(layout, dtype=torch.bool)
        labels = torch.where(visual, IGNORE_INDEX, torch.randint(5, 50, (n,), generator=generator))
        labels[: n // 2] = IGNORE_INDEX
        state.hidden[b, cols] = torch.randn(n, 3, generator=generator)
        state.attention_mask[b, cols] = True
        state.position_ids[b, cols] = torch.arange(n) + 2040  # float16 rounds past 2048
        state.visual_mask[b, cols] = visual
        state.labels[b, cols] = labels
        state.role[b, cols] = roles_of(visual, labels)
    for stride in (1, 3, 4):
        fast, reference = state.pool_visual(stride, positions), per_span_pooling(state, stride, positions)
        for name in ("hidden", "attention_mask", "position_ids", "visual_mask", "labels", "role"):
            got, want = getattr(fast, name), getattr(reference, name)
            assert got.dtype == want.dtype and torch.equal(got, want), (stride, name)
    with pytest.raises(ValueError, match="positions"):
        state.pool_visual(2, "mean")


def test_half_precision_keeps_rotary_buffers_in_float32(tmp_path):
    """`to_precision` casts the weights and leaves floating buffers as `from_pretrained(dtype=)`
    loads them. On LLaVA-1.5-7B's rotary embedding run in bfloat16, the cos/sin of the first 700
    positions (576 image tokens and a question) then stay within bfloat16's rounding, where
    `.to(bfloat16)`, which rounds `inv_freq` too, puts some out by more than 0.5. A tiny base
    built in bfloat16 keeps the buffers as a llava-hf folder loaded in bfloat16 does."""
    from transformers import LlavaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlavaConfig.from_pretrained(REPO_ROOT / "models/configs/llava-1.5-7b-hf").text_config
    reference, positions = LlamaRotaryEmbedding(config), torch.arange(700)[None]

    def worst(holder):  # the largest cos/sin error over those positions, run in bfloat16
        x = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
        pairs = zip(holder["rotary"](x, positions), reference(x.float(), positions), strict=True)
        return max((got.float() - want).abs().max().item() for got, want in pairs)

    kept = to_precision(torch.nn.ModuleDict({"rotary": LlamaRotaryEmbedding(config)}), torch.bfloat16)
    cast = torch.nn.ModuleDict({"rotary": LlamaRotaryEmbedding(config)}).to(torch.bfloat16)
    assert worst(kept) < 0.01 and worst(cast) > 0.5

    full = build("tiny", tiny=TEST_TINY)
    save_as_llava_hf(full, tmp_path)
    for half in (
        build("tiny", tiny=TEST_TINY, dtype=torch.bfloat16),
        build(str(tmp_path), dtype=torch.bfloat16),
    ):
        assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
        buffers = floating_buffers(half.model)
        assert buffers and {b.dtype for b in buffers.values()} == {torch.float32}
        for name, buffer in floating_buffers(full.model).items():
            torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0)


def test_bf16_true_training_keeps_float32_buffers_through_lightnings_cast():
    """Lightning's `precision: bf16-true` casts the whole module with `.to(dtype)`, buffers too
    (DeepSpeed and `from_pretrained` keep them float32), before DDP wraps it: the LightningModule
    keeps them float32 through that cast, so DDP records the tensors the model reads."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from train.module import VtcModule
    from train.recipe import load_recipe

    built = build("tiny", tiny=TEST_TINY)
    before = {name: buffer.clone() for name, buffer in floating_buffers(built.model).items()}
    module = VtcModule(built.model, load_recipe("tiny/smoke").stages[0], total_steps=1)
    module = HalfPrecision("bf16-true").convert_module(module)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    after = floating_buffers(module.model)
    assert before and after.keys() == before.keys()
    for name, buffer in before.items():
        torch.testing.assert_close(after[name], buffer, rtol=0, atol=0)


def test_loading_a_small_model_shows_no_loading_bar_and_a_large_one_does(capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    import models.build
    from models.pretrained import shipped_path

    build(str(shipped_path("tiny-llava")))
    assert "Loading weights" not in capfd.readouterr().err  # 7 MB: instant, so no bar per load
    assert hf_logging.is_progress_bar_enabled()  # the setting is left as it was
    monkeypatch.setattr(models.build, "QUIET_LOAD_BYTES", 0)  # as if it were a 7B's 14 GB
    build(str(shipped_path("tiny-llava")))
    assert "Loading weights" in capfd.readouterr().err
