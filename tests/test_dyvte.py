"""DyVTE: per-layer routers that drop a sample's visual tokens, trained by the authors' rule."""

import csv
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.build import ComponentSpec, build
from models.compressors.base import Progress
from models.compressors.dyvte import DyVTE, exit_labels
from models.sequence import SequenceState
from tests.conftest import TEST_TINY, assert_generation_matches_forwards
from train.objectives import OBJECTIVES
from train.recipe import load_recipe
from train.run import run_recipe


def dyvte(seed=0):
    return build("tiny", compressors=[ComponentSpec("dyvte", {"hidden": 32})], tiny=TEST_TINY, seed=seed)


def inputs(built, prompts=((10, 11, 12), (10,))):
    """Samples <s> <image> prompt… answer(2 tokens), right-padded, answers labelled."""
    model, tok = built.model, built.tokenizer
    rows = [[tok.bos_token_id, model.image_token_id, *p, 20, 21] for p in prompts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    labels = torch.full((len(rows), width), -100)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
        labels[b, len(row) - 2 : len(row)] = torch.tensor([20, 21])
    pixels = torch.randn(len(rows), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return ids, mask, pixels, labels


def test_the_label_rule_on_a_hand_built_example():
    """Logits = hidden states (identity head). Sample 0: both continuations give the same
    argmax and masked loss within 3 % → exit. Sample 1: same argmax, masked loss far higher →
    stay. Sample 2: argmax differs on one of two tokens → stay. Sample 3: no answer tokens."""
    head = nn.Identity()
    labels = torch.tensor([[-100, 0, 0], [-100, 0, 0], [-100, 0, 1], [-100, -100, -100]])
    normal = torch.tensor(
        [[[3.0, 0], [3.0, 0], [0, 0]]] * 2 + [[[3.0, 0], [0, 3.0], [0, 0]]] + [[[0.0, 0]] * 3]
    )
    masked = normal.clone()
    masked[0, :2] = torch.tensor([3.02, 0.0])  # a hair more confident: lower loss
    masked[1, :2] = torch.tensor([0.5, 0.0])  # right answer, much less sure
    masked[2, 1] = torch.tensor([3.0, 0.0])  # second answer token flips

    def state(hidden):
        visual = torch.zeros(4, 3, dtype=torch.bool)
        return SequenceState(
            hidden, torch.ones(4, 3, dtype=torch.bool), torch.arange(3).expand(4, -1), visual, labels
        )

    label, has_answer = exit_labels(state(normal), state(masked), head, 0.99, 1.03)
    assert label.tolist() == [1, 0, 0, 0] and has_answer.tolist() == [True, True, True, False]
    # the loss bound: 1.03 × the normal loss
    masked[1, :2] = torch.tensor([2.98, 0.0])  # loss 0.0495 vs 0.0486: within 3 %
    label, _ = exit_labels(state(normal), state(masked), head, 0.99, 1.03)
    assert label[1] == 1


def test_the_router_feature_is_the_instruction_mean_and_the_last_prompt_token():
    """By hand, per sample: the mean of the instruction tokens but the last (none for a one-token
    instruction: zeros), then the last prompt token; again after an exit re-pads the batch (the
    weights built for the first layout must not be reused)."""
    built = dyvte()
    component = built.model.compressors[0]
    ids, mask, pixels, labels = inputs(built, prompts=((10, 11, 12), (10,), (12, 11)))
    with torch.no_grad():
        state = built.model.prepare(ids, mask, pixels, labels)
    state.hidden = torch.randn(state.hidden.shape, generator=torch.Generator().manual_seed(0))

    def by_hand(state):
        rows = []
        for b in range(state.hidden.shape[0]):
            prompt = state.prompt_mask[b].nonzero()[:, 0]
            hidden = state.hidden[b]
            mean = hidden[prompt[:-1]].mean(0) if len(prompt) > 1 else torch.zeros(hidden.shape[1])
            rows.append(torch.cat([mean, hidden[prompt[-1]]]))
        return torch.stack(rows)

    torch.testing.assert_close(component.feature(state), by_hand(state))
    later = replace(state, hidden=state.hidden.flip(-1))  # the next layer: same layout
    torch.testing.assert_close(component.feature(later), by_hand(later))
    exited = state.keep(~(state.visual_mask & torch.tensor([True, False, False])[:, None]))
    assert exited.hidden.shape[1] < state.hidden.shape[1]  # sample 0 was the longest
    torch.testing.assert_close(component.feature(exited), by_hand(exited))


def exit_by_prompt_length(self, layer, state):
    """A decision that depends on the sample only: 3 instruction tokens exit after layer 0,
    one after layer 1 (so a batch holds samples that exit at different layers)."""
    prompt = state.prompt_mask.sum(1)
    return torch.where(prompt >= 3, torch.tensor(layer == 0), torch.tensor(layer == 1))


def test_samples_exiting_at_different_layers_answer_as_one_by_one(monkeypatch):
    monkeypatch.setattr(DyVTE, "wants_exit", exit_by_prompt_length)
    built = dyvte(seed=1)
    model = built.model.eval()
    ids, mask, pixels, _ = inputs(built)
    prompts = ids[:, :-2], mask[:, :-2]  # drop the answers: generation prompts
    layer_sizes = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: layer_sizes.append((i, args[0].shape[1])))
        for i, layer in enumerate(model.llm.body.layers)
    ]
    try:
        with torch.no_grad():
            batch = model(ids, mask, pixels, return_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    longest = int(mask.sum(1).max()) + 63  # 64 visual tokens for the <image> id
    assert [n for _, n in layer_sizes] == [longest, longest - 64, longest - 64]  # both gone by layer 2
    generated, _, visual_layers = model.generate(*prompts, pixels, max_new_tokens=3)
    for b in range(2):
        real = mask[b]
        with torch.no_grad():
            alone = model(ids[b : b + 1, real], mask[b : b + 1, real], pixels[b : b + 1], return_logits=True)
        got = batch.logits[b][batch.state.attention_mask[b]]
        torch.testing.assert_close(got, alone.logits[0], rtol=1e-5, atol=1e-5)
        prompt = prompts[0][b][prompts[1][b]][None]
        one, _, layers_alone = model.generate(
            prompt, torch.ones_like(prompt, dtype=torch.bool), pixels[b : b + 1], 3
        )
        assert torch.equal(one[0], generated[b])
        assert torch.equal(layers_alone[0], visual_layers[b])  # its own exit, as the layer mean counts it
        assert_generation_matches_forwards(
            model, prompt[0], pixels[b : b + 1], generated[b], 3
        )  # after an exit
    counted = model.compressors[0]
    assert counted.statistics()["exit_layers"]["0"] >= 1
    # what a stopped evaluation row saves, loaded into another instance, is the same report
    other = dyvte(seed=2).model.compressors[0]
    other.load_statistics_state(json.loads(json.dumps(counted.statistics_state())))
    assert (
        other.statistics() == counted.statistics() and other.statistics_state() == counted.statistics_state()
    )


def test_gradients_reach_only_the_drawn_router():
    built = dyvte()
    model = built.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask, pixels, labels = inputs(built)
    states = model.set_progress(Progress(5, 10, ("router_ce",)))
    drawn = int(states["dyvte.layer"])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}
    terms = OBJECTIVES["aux"].terms(model, batch)
    assert {"router_ce", "dyvte/label_rate", "dyvte/router_accuracy"} <= set(terms)
    terms["router_ce"].backward()
    learned = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learned and all(n.startswith(f"compressors.0.routers.{drawn}.") for n in learned)
    assert model.set_progress(Progress(5, 10, ("router_ce",))) == states  # the draw follows the step


def logged(run_dir, column):
    rows = list(csv.DictReader(open(run_dir / "logs" / "instruct" / "metrics.csv")))
    return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}


@pytest.mark.slow
def test_a_killed_router_run_resumes_to_bit_identical_weights(tmp_path, monkeypatch):
    def recipe(out):
        overrides = [f"output={out}", f"data.cache_dir={tmp_path / 'data'}", "stages.0.steps=2"]
        overrides += ["stages.1.steps=10", "stages.1.objective=aux", "checkpoint.every=4", "eval.limit=2"]
        overrides += ["model.compressors=[{name: dyvte, hidden: 16}]"]
        overrides += ["stages.1.train={vision: frozen, projector: frozen, compressors: full, llm: frozen}"]
        return load_recipe("tiny/smoke", overrides)

    run_recipe(recipe(tmp_path / "a"))
    drawn = logged(tmp_path / "a", "schedule/dyvte.layer")
    assert set(drawn.values()) == {0.0} and len(drawn) == 10  # a 2-layer LLM has one router
    assert len(logged(tmp_path / "a", "train/dyvte/label_rate")) == 10
    original = DyVTE.set_progress

    def crash_at_6(self, progress):
        if progress is not None and progress.step == 6:
            raise RuntimeError("simulated crash before step 6")
        return original(self, progress)

    monkeypatch.setattr(DyVTE, "set_progress", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe(tmp_path / "b"))
    monkeypatch.setattr(DyVTE, "set_progress", original)
    run_recipe(recipe(tmp_path / "b"), resume="auto")
    a, b = (load_file(str(d / "trainable.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert any(k.startswith("compressors.0.routers.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_exit_bound_spends_accuracy_where_it_saves_most_layers():
    """bench/dyvte.py's bound at a given accuracy kept, on hand-built answers: 3 layers, routers
    after layers 0 and 1; accuracy is the mean over families, as `vtc evaluate` scores it."""
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, "bench")
    from dyvte import spend_slack

    questions = SimpleNamespace(
        questions=[
            SimpleNamespace(id=q, family=f) for q, f in [("q1", "a"), ("q2", "a"), ("q3", "b"), ("q4", "b")]
        ]
    )
    ids = ["q1", "q2", "q3", "q4"]
    base = {"q1": True, "q2": True, "q3": True, "q4": False}
    after_0 = {"q1": True, "q2": False, "q3": False, "q4": False}
    after_1 = {"q1": True, "q2": True, "q3": False, "q4": True}
    right = [base, after_0, after_1]
    # keeping every right answer: q1 exits after layer 0 (1 layer sees the image), q2 after
    # layer 1 (2), q3 never (3), q4 (wrong anyway) after layer 0 (1)
    assert spend_slack(questions, ids, right, 3, 1.0) == pytest.approx(7 / 12)
    # base accuracy (1 + 1/2) / 2 = 0.75; at half of it, 0.375 to spend, one answer weighs 0.25:
    # q3, which saves two layers, goes first; q2 (one layer) no longer fits
    assert spend_slack(questions, ids, right, 3, 0.5) == pytest.approx(5 / 12)
    # nothing to spend: the same as keeping every right answer
    assert spend_slack(questions, ids, right, 3, 0.99) == pytest.approx(7 / 12)


def test_the_deep_recipe_labels_more_exits_deeper_on_its_shipped_base(tmp_path):
    """`tiny/dyvte-deep` on the shipped 8-layer base: the labels its routers learn from are not
    trivial — after the first layer few samples can lose the image, after the last nearly all."""
    import sys

    sys.path.insert(0, "bench")
    from dyvte import label_rates

    overrides = [f"data.cache_dir={tmp_path}", "data.synthetic.train=64", "data.synthetic.test=8"]
    rates = label_rates("tiny/dyvte-deep", overrides, batches=2)["exit_label_rate"]
    assert len(rates) == 7  # a router after every layer but the last
    assert rates[0] < 0.3 and rates[-1] > 0.8, rates
    assert rates[-1] == max(rates)


def test_the_exit_confidence_is_the_argmax_at_one_half_and_exits_fewer_above():
    """`exit_confidence` c: exit iff the router's P(exit) > c. At 0.5 that is the authors' argmax;
    a higher c exits exactly the samples whose P(exit) clears it; a bad value is refused."""
    built = build(
        "tiny",
        compressors=[ComponentSpec("dyvte", {"hidden": 32, "exit_confidence": 0.5})],
        tiny=TEST_TINY,
        seed=0,
    )
    component = built.model.compressors[0]
    ids, mask, pixels, labels = inputs(built, prompts=[(10 + i % 3,) * (1 + i % 4) for i in range(16)])
    with torch.no_grad():
        state = built.model.prepare(ids, mask, pixels, labels)
    state.hidden = torch.randn(state.hidden.shape, generator=torch.Generator().manual_seed(0))
    for router in component.routers:  # spread the decisions: some exit, some stay, at any c
        nn.init.normal_(router[-1].weight, std=3.0)
    with torch.no_grad():
        p_exit = component.routers[0](component.feature(state)).softmax(-1)[:, 1]
        argmax = component.routers[0](component.feature(state)).argmax(-1) == 1
    assert torch.equal(component.wants_exit(0, state), argmax)
    assert 0 < int(argmax.sum()) < 16
    for confidence in (0.2, 0.8, 0.95):
        component.config = replace(component.config, exit_confidence=confidence)
        assert torch.equal(component.wants_exit(0, state), p_exit > confidence)
    assert int((p_exit > 0.95).sum()) < int(argmax.sum())  # the same routers exit fewer samples
    problems = DyVTE.check_config(replace(component.config, exit_confidence=1.0), component.dims)
    assert [key for key, _ in problems] == ["exit_confidence"]


def test_evaluate_counts_every_questions_exit_in_the_layer_mean_and_flops(tmp_path, monkeypatch):
    """A row of a dynamic method: its per-layer tokens, layer mean and LLM FLOPs are means over
    the questions answered (each at its own exit and with its own words), not the first
    question's; they agree with the exit layers DyVTE counted itself."""
    from PIL import Image

    from models.export import export
    from models.flops import llm_flops
    from models.pretrained import shipped_path
    from train.evaluate import Settings, evaluate
    from train.evaluation.measure import prompt_words

    def exit_by_prompt_parity(self, layer, state):  # questions one word apart: mixed exits
        even = state.prompt_mask.sum(1) % 2 == 0
        return torch.where(even, torch.tensor(layer == 0), torch.tensor(layer == 2))

    monkeypatch.setattr(DyVTE, "wants_exit", exit_by_prompt_parity)
    base = str(shipped_path("tiny-llava"))
    spec = ComponentSpec("dyvte", {"hidden": 16})
    built = build(base, compressors=[spec])
    out = export(built, tmp_path / "dyvte", ComponentSpec("mlp2x_gelu"), [spec], base, compressor_only=True)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "img" / "red.png")
    texts = ["What colour is the dot?"] * 3 + ["What colour is the small dot?"]
    lines = [{"question_id": i, "image": "red.png", "text": t} for i, t in enumerate(texts)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = evaluate(
        str(out),
        [],
        questions_file=str(tmp_path / "q.jsonl"),
        images_dir=str(tmp_path / "img"),
        settings=Settings(timing=False),
        baseline="none",
    )
    (row,) = report["rows"]
    exits = row["statistics"]["dyvte"]["exit_layers"]
    taken = {k: n for k, n in exits.items() if n}
    assert sorted(taken.values()) == [1, 3] and set(taken) == {"0", "2"}  # each text at its own exit
    counts = ", ".join(f"{k}: {n}" for k, n in exits.items())
    assert f"- model, dyvte: exit_layers {counts}; visual_layer_share " in (out / "eval.md").read_text()
    exit_of = {t: next(k for k, n in taken.items() if n == texts.count(t)) for t in texts}
    layers, visual = len(built.model.llm.body.layers), 64
    seen = {"0": 1, "1": 2, "2": 3, "none": layers}  # layers that hold the visual tokens
    words = {t: prompt_words(built, t) for t in texts}
    assert words[texts[-1]] == words[texts[0]] + 1
    per_question = [
        [words[t] + (visual if seen[exit_of[t]] > i else 0) for i in range(layers)] for t in texts
    ]
    assert row["layer_tokens"] == pytest.approx(
        [sum(q[i] for q in per_question) / 4 for i in range(layers)], abs=0.01
    )
    assert row["visual_tokens_layer_mean"] == pytest.approx(
        row["statistics"]["dyvte"]["visual_layer_share"] * visual
    )
    config = built.hf.config.text_config
    assert row["flops"]["llm"] == pytest.approx(sum(llm_flops(config, q) for q in per_question) / 4)


def test_the_exit_confidence_is_set_at_test_time_as_a_row_beside_the_model(tmp_path):
    """`vtc evaluate --setting dyvte.exit_confidence=0.9`: the same routers, asked for more
    confidence, exit fewer questions; the row sits beside the model's, compared with it
    question by question, and its layer mean and FLOPs follow its own exits."""
    from models.export import export
    from models.pretrained import shipped_path
    from train.evaluate import Settings, evaluate

    base = str(shipped_path("tiny-llava"))
    spec = ComponentSpec("dyvte", {"hidden": 16})
    built = build(base, compressors=[spec], seed=0)
    out = export(built, tmp_path / "dyvte", ComponentSpec("mlp2x_gelu"), [spec], base, compressor_only=True)
    settings = Settings(limit=8, timing=False)
    report = evaluate(
        str(out), [], settings=settings, baseline="none", test_settings=["dyvte.exit_confidence=0.9"]
    )
    model, sure = report["rows"]
    assert sure["method"] == "model[dyvte.exit_confidence=0.9]" and "vs_model" in sure
    never = lambda row: row["statistics"]["dyvte"]["exit_layers"]["none"]  # noqa: E731
    assert never(model) < never(sure)
    assert model["visual_tokens_layer_mean"] < sure["visual_tokens_layer_mean"]
    assert model["flops"]["llm"] < sure["flops"]["llm"]
