"""LLaVolta: in-LLM 1-D pooling of the image span on a schedule over training."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from models.build import ComponentSpec, build
from models.compressors.base import Progress
from models.compressors.llavolta import LLaVolta, LLaVoltaConfig, Phase, compression_ratio
from models.sequence import SequenceState
from tests.conftest import TEST_TINY, assert_generation_matches_forwards, ragged_prompts
from train.recipe import RecipeError, load_recipe, recipe_from_dict
from train.run import run_recipe


def volta(layer, stride, positions="float16", seed=0, **extra):
    phase = {"layer": layer, "stride": stride}
    params = {"schedule": [phase], "inference": phase, "positions": positions, **extra}
    return build("tiny", compressors=[ComponentSpec("llavolta", params)], tiny=TEST_TINY, seed=seed)


def plain(seed=0):
    return build("tiny", tiny=TEST_TINY, seed=seed)


def batch(model, tokenizer, side="right"):
    """Two ragged prompts (6 and 4 tokens) with one image each, padded on `side`."""
    ids, mask = ragged_prompts(model, tokenizer)
    if side == "left":
        shift = (~mask).sum(1)
        ids = torch.stack([row.roll(int(n)) for row, n in zip(ids, shift, strict=True)])
        mask = torch.stack([row.roll(int(n)) for row, n in zip(mask, shift, strict=True)])
    return ids, mask, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_compression_ratio_is_the_papers():
    assert f"{compression_ratio(32, 2, 8):.0%}" == "557%"  # the paper's K=2, S=8 on LLaVA-1.5-7B
    assert compression_ratio(32, None, 8) == 1.0 and compression_ratio(32, -1, 4) == 4.0
    component = volta(2, 8).model.compressors[0]
    assert (
        component.describe(Progress(0, 100))[0]
        == f"phase 0: steps 0..99  K=2 S=8  CR {compression_ratio(3, 2, 8):.0%}"
    )


@pytest.mark.parametrize("layer", [-1, 0, 2])
def test_stride_one_is_bit_identical_to_no_compression(layer, tokenizer):
    pooled, reference = volta(layer, 1).model, plain().model
    ids, mask, pixels = batch(pooled, tokenizer)
    labels = ids.masked_fill(~mask, -100)
    a = pooled(ids, mask, pixels, labels, return_logits=True)
    b = reference(ids, mask, pixels, labels, return_logits=True)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.logits[a.state.attention_mask], b.logits[b.state.attention_mask])


def hand_state():
    """Two samples, right-padded: visual spans of 5 (positions 1..5) and 3 (positions 2..4)."""
    visual = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    hidden = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1).expand(-1, -1, 2).clone()
    return SequenceState(hidden, mask, torch.arange(8).expand(2, -1).clone(), visual)


@pytest.mark.parametrize("positions", ["float16", "exact"])
def test_pooled_states_equal_a_hand_computation(positions):
    component = LLaVolta(
        LLaVoltaConfig((Phase(layer=1, stride=2),), positions=positions), volta(1, 2).model.dims
    )
    component.train().set_progress(Progress(0, 10))
    untouched = hand_state()
    assert component.before_layer(0, untouched) is untouched  # only before layer K
    out = component.before_layer(1, hand_state())
    # sample 0: text 0 | groups (1,2) (3,4) and the remainder (5) on its own | text 6, 7
    assert out.hidden[0, :, 0].tolist() == [0, 1.5, 3.5, 5, 6, 7]
    # sample 1: text 8, 9 | groups (10,11) and (12) | text 13; right padding after it
    assert out.hidden[1, :5, 0].tolist() == [8, 9, 10.5, 12, 13]
    assert out.attention_mask.sum(1).tolist() == [6, 5]
    expected = (
        [[0, 1, 3, 5, 6, 7], [0, 1, 2, 4, 5]]
        if positions == "float16"
        else [[0, 1.5, 3.5, 5, 6, 7], [0, 1, 2.5, 4, 5]]
    )
    got = [out.position_ids[b, out.attention_mask[b]].tolist() for b in range(2)]
    assert got == expected
    assert out.visual_mask.sum(1).tolist() == [3, 2]


def test_float16_positions_follow_the_authors_rounding():
    """Past 2048, float16 holds only even integers: the cast loses what the exact mean keeps."""
    positions = torch.tensor([[3000, 3001, 3002, 3003, 3004, 3005]])  # text, 4 visual, text
    state = SequenceState(
        torch.zeros(1, 6, 1),
        torch.ones(1, 6, dtype=torch.bool),
        positions,
        torch.tensor([[False, True, True, True, True, False]]),
    )
    rounded = state.pool_visual(4, "float16").position_ids[0].tolist()
    exact = state.pool_visual(4, "exact").position_ids[0].tolist()
    assert exact == [3000, 3002.5, 3005]
    assert rounded == [3000, int(torch.tensor([3000, 3002, 3004, 3004]).float().mean().half()), 3005]


@pytest.mark.parametrize("layer,side", [(1, "right"), (-1, "left"), (0, "right")])
def test_cached_generation_equals_full_forwards_and_ragged_batches_answer_as_one(layer, side, tokenizer):
    model = volta(layer, 4, seed=1).model.eval()
    ids, mask, pixels = batch(model, tokenizer, side)
    generated, visual_in, _ = model.generate(ids, mask, pixels, max_new_tokens=4)
    for b in range(2):
        prompt = ids[b, mask[b]]
        alone, _, _ = model.generate(
            prompt[None], torch.ones(1, len(prompt), dtype=torch.bool), pixels[b : b + 1], 4
        )
        assert torch.equal(alone[0], generated[b])  # a ragged batch answers as one by one
        assert_generation_matches_forwards(model, prompt, pixels[b : b + 1], generated[b], 4)


def test_schedule_switches_at_its_fractions_and_inference_has_its_own_setting(tokenizer):
    phases = [{"layer": 2, "stride": 8, "until": 0.25}, {"layer": 2, "stride": 2, "until": 0.5}]
    phases += [{"layer": 16, "stride": 2, "until": 0.75}, {"layer": None, "until": 1.0}]
    model = build(
        "tiny",
        compressors=[ComponentSpec("llavolta", {"schedule": phases, "reference_layers": 32})],
        tiny=TEST_TINY,
    ).model.train()
    component = model.compressors[0]
    seen = [model.set_progress(Progress(step, 8)) for step in range(8)]
    assert [s["llavolta.phase"] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s["llavolta.stride"] for s in seen] == [8, 8, 2, 2, 2, 2, 1, 1]
    # K=2 of 32 layers → 1 of 3 (at least one layer sees every token), K=16 → 2
    assert [s["llavolta.layer"] for s in seen[::2]] == [1, 1, 2, 3]
    model.set_progress(None)
    assert component.phase() is None  # the four-stage scheme evaluates uncompressed
    ids, mask, pixels = batch(model, tokenizer)
    labels = ids.masked_fill(~mask, -100)
    model.set_progress(Progress(0, 8))
    tokens = []
    hook = model.llm.body.layers[2].register_forward_pre_hook(
        lambda _m, args: tokens.append(args[0].shape[1])
    )
    try:
        model(ids, mask, pixels, labels)  # training: K=1, S=8 → 64 visual tokens become 8
        model.eval()
        model(ids, mask, pixels, labels)  # evaluation: inference setting (none)
    finally:
        hook.remove()
    assert tokens[0] == tokens[1] - 64 + 8


def test_recipe_errors_name_the_schedule_keys():
    recipe = load_recipe("tiny/llavolta-4stage")
    assert recipe.model.compressors[0].name == "llavolta"
    bad = {
        "description": "x",
        "output": "o",
        "model": {
            "compressors": [{"name": "llavolta", "schedule": [{"layer": 9, "stride": 0, "until": 0.5}]}]
        },
        "stages": [{"name": "s", "steps": 1}],
    }
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    text = str(err.value)
    assert (
        "model.compressors[0].schedule[0].stride" in text and "model.compressors[0].schedule[0].layer" in text
    )
    assert "end at 1.0" in text


def logged(run_dir, column):
    """{step: value} of a column of the instruct stage's CSV log."""
    rows = list(csv.DictReader(open(run_dir / "logs" / "instruct" / "metrics.csv")))
    return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}


SCHEDULE = (
    "model.compressors=[{name: llavolta, schedule: [{layer: 1, stride: 4, until: 0.25}, "
    "{layer: 0, stride: 2, until: 0.5}, {layer: -1, stride: 2, until: 0.75}, {layer: null, until: 1.0}]}]"
)


def smoke(out, data_dir):
    overrides = [f"output={out}", f"data.cache_dir={data_dir}", "stages.0.steps=2", "stages.1.steps=12"]
    return load_recipe("tiny/smoke", overrides + [SCHEDULE, "checkpoint.every=5", "eval.limit=2"])


@pytest.mark.slow
def test_a_run_killed_mid_schedule_resumes_to_bit_identical_weights(tmp_path, monkeypatch):
    data = tmp_path / "data"
    run_recipe(smoke(tmp_path / "a", data))
    stride = logged(tmp_path / "a", "schedule/llavolta.stride")
    layer = logged(tmp_path / "a", "schedule/llavolta.layer")
    assert [stride[s] for s in (0, 2, 3, 5, 6, 8, 9, 11)] == [4, 4, 2, 2, 2, 2, 1, 1]
    assert [layer[s] for s in (0, 3, 6, 9)] == [1, 0, -1, 2]  # null: no layer pools (reported as N)
    ratio = logged(tmp_path / "a", "schedule/llavolta.compression_ratio")
    assert ratio[0] == pytest.approx(compression_ratio(2, 1, 4)) and ratio[9] == 1.0

    original = LLaVolta.set_progress

    def crash_at_7(self, progress):
        if progress is not None and progress.step == 7:
            raise RuntimeError("simulated crash before step 7")
        return original(self, progress)

    monkeypatch.setattr(LLaVolta, "set_progress", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(smoke(tmp_path / "b", data))
    monkeypatch.setattr(LLaVolta, "set_progress", original)
    run_recipe(smoke(tmp_path / "b", data), resume="auto")
    assert logged(tmp_path / "b", "schedule/llavolta.stride") == stride
    a, b = (load_file(str(d / "trainable.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert any(k.startswith("llm.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_vtc_evaluate_sets_a_run_beside_its_uncompressed_twin(tmp_path):
    """`vtc evaluate RUN --compare OTHER --uncompressed`: the heavy-compression run, its weights
    without compression, and the same fine-tune trained without compression, one report."""
    from train.cli import main

    common = [f"data.cache_dir={tmp_path / 'data'}", "data.synthetic.train=64", "data.synthetic.test=4"]
    common += ["data.num_workers=0", "stages.0.steps=2", "stages.0.batch_size=4", "eval.limit=2"]
    for scheme in ("heavy", "none"):
        run_recipe(load_recipe(f"tiny/llavolta-{scheme}", [f"output={tmp_path / scheme}", *common]))
    args = ["evaluate", str(tmp_path / "heavy"), "--baselines", "", "--limit", "2", "--no-timing"]
    args += ["--compare", str(tmp_path / "none"), "--uncompressed", "--out", str(tmp_path / "r")]
    args += ["--setting", "llavolta.inference=null", "--setting", "llavolta.inference={layer: 16, stride: 2}"]
    assert main(args) == 0
    import json

    rows = {r["method"]: r for r in json.loads((tmp_path / "r" / "eval.json").read_text())["rows"]}
    assert set(rows) == {
        "baseline",
        "model",
        "model-uncompressed",
        "none",
        "model[llavolta.inference=null]",
        "model[llavolta.inference={layer: 16, stride: 2}]",
    }
    # another inference phase at test time: none is the weights without compression; the
    # light phase (K=16 of 32 → before layer 2, S=2) pools 64 → 32 tokens from layer 2 on
    assert (
        rows["model[llavolta.inference=null]"]["layer_tokens"] == rows["model-uncompressed"]["layer_tokens"]
    )
    light = rows["model[llavolta.inference={layer: 16, stride: 2}]"]["layer_tokens"]
    # (means over the questions, each at its own words: to 2 decimals)
    assert light == pytest.approx(
        [n if i < 2 else n - 32 for i, n in enumerate(rows["none"]["layer_tokens"])]
    )
    # heavy: 4 LLM layers, K=2 of 32 → pooled before layer 1, 64 → 8 tokens in layers 1..3
    assert rows["model"]["layer_tokens"] == pytest.approx(
        [n if i == 0 else n - 56 for i, n in enumerate(rows["none"]["layer_tokens"])]
    )
    assert rows["model-uncompressed"]["layer_tokens"] == rows["none"]["layer_tokens"]
    assert rows["model"]["flops"]["llm"] < rows["model-uncompressed"]["flops"]["llm"]
    # the two trained rows carry their runs' training speed; the base and the weights without
    # their compression were not trained as such
    for label, run in (("model", "heavy"), ("none", "none")):
        (stage,) = json.loads((tmp_path / run / "meta.json").read_text())["stages"]
        assert rows[label]["training"] == [
            {key: stage[key] for key in ("name", "steps", "seconds", "samples_per_second")}
        ]
        assert stage["samples_per_second"] > 0
    assert "training" not in rows["baseline"] and "training" not in rows["model-uncompressed"]
    report = (tmp_path / "r" / "eval.md").read_text()
    (trained,) = rows["model"]["training"]
    assert f"| model | {trained['name']} | 2 | " in report
    assert f" | {trained['samples_per_second']:.1f} |" in report


def test_images_of_different_token_counts_pool_and_answer_as_one_by_one(tokenizer):
    """Multi-view images of different grids (336 and 200 visual tokens here): each span is pooled
    on its own, its remainder included."""
    from models.views import MultiViewConfig
    from tests.test_views import png

    built = build(
        "tiny",
        compressors=[
            ComponentSpec(
                "llavolta", {"schedule": [{"layer": 1, "stride": 8}], "inference": {"layer": 1, "stride": 8}}
            )
        ],
        tiny=TEST_TINY,
        seed=4,
        views=MultiViewConfig(((1, 1), (1, 2), (2, 2)), newline=True),
    )
    from data.dataset import load_views

    model = built.model.eval()
    pixels, grids = zip(
        *(load_views(png(size), 64, model.view_tiling) for size in ((128, 128), (128, 64))), strict=True
    )
    ids, mask = ragged_prompts(model, tokenizer)
    grids = torch.tensor(grids)
    generated, visual, _ = model.generate(ids, mask, torch.cat(pixels), max_new_tokens=3, image_grids=grids)
    assert visual.tolist() == [model.visual_tokens((2, 2)), model.visual_tokens((1, 2))]
    for b in range(2):
        prompt = ids[b, mask[b]][None]
        alone, _, _ = model.generate(
            prompt, torch.ones_like(prompt, dtype=torch.bool), pixels[b], 3, image_grids=grids[b : b + 1]
        )
        assert torch.equal(alone[0], generated[b])
