"""CoViPAL: a text-conditioned scorer, trained from a frozen LLM's guidance-layer attention."""

import pytest
import torch

from data.synth import FAMILIES
from models.build import ComponentSpec, build
from models.compressors.base import Progress
from models.sequence import positions_of
from tests.conftest import TEST_TINY, ragged_prompts
from train.objectives import OBJECTIVES


def covipal(seed=0, **params):
    params = {"layer": 0, "guidance_layer": 1, "reserve": 0.25, **params}
    return build("tiny", compressors=[ComponentSpec("covipal", params)], tiny=TEST_TINY, seed=seed)


def inputs(built, answer=(20, 21)):
    """Two ragged samples: <s> <image> prompt... then two answer tokens (labelled)."""
    model, tok = built.model, built.tokenizer
    rows = [
        [tok.bos_token_id, model.image_token_id, 10, 11, 12, *answer],
        [tok.bos_token_id, model.image_token_id, 10, *answer],
    ]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    labels = torch.full((2, 7), -100)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
        labels[b, len(row) - 2 : len(row)] = torch.tensor(answer)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return ids, mask, pixels, labels


@pytest.mark.parametrize("queries", ["instruction", "last", "after_image"])
def test_targets_equal_eager_attention_by_hand(queries):
    built = covipal(guidance_layer=1, guidance_queries=queries)
    model = built.model.eval()
    ids, mask, pixels, labels = inputs(built)
    state = model.prepare(ids, mask, pixels, labels)
    columns, valid = positions_of(state.visual_mask & state.attention_mask)
    component = model.compressors[0]
    targets, has_text = component.guidance_targets(state, columns)
    body = model.llm.body
    body.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = body(
                inputs_embeds=state.hidden,
                attention_mask=state.attention_mask.long(),
                position_ids=state.position_ids,
                output_attentions=True,
            ).attentions[1]  # (B, heads, T, T) of layer 1
    finally:
        body.config._attn_implementation = "sdpa"
    for b in range(2):
        prompt = state.prompt_mask[b].clone()  # the instruction after the image: never the answer
        if queries == "last":  # only the prompt token that predicts the answer
            prompt[: int(prompt.nonzero().max())] = False
        if queries == "after_image":  # the instruction and the two answer tokens
            prompt |= state.labels[b] != -100
        assert int(prompt.sum()) == {"last": 1, "instruction": [3, 1][b], "after_image": [5, 3][b]}[queries]
        expected = eager[b].sum(0)[prompt].sum(0)[columns[b, valid[b]]]
        torch.testing.assert_close(targets[b, valid[b]], expected, rtol=1e-4, atol=1e-6)
    assert has_text.tolist() == [True, True]


def test_only_the_scorer_learns_and_the_teacher_stops_at_the_guidance_layer():
    built = covipal(guidance_layer=1)
    model = built.model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # even so, nothing but the scorer may get a gradient
    ids, mask, pixels, labels = inputs(built)
    calls = [0] * model.llm.num_layers
    hooks = [
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.llm.body.layers)
    ]
    model.set_progress(Progress(0, 10, ("scorer_mse",)))
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}
    try:
        terms = OBJECTIVES["aux"].terms(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [2, 2, 1]  # teacher: layers 0..1 (L_p..L_g); the pruned pass: every layer
    terms["scorer_mse"].backward()
    learned = {
        n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert learned == {"compressors"}
    assert terms["visual_tokens"] == 64  # the LLM's input; the layers see 16


def test_the_scorer_never_reads_an_answer():
    built = covipal()
    model, component = built.model.eval(), built.model.compressors[0]
    scores = []
    for answer in ((20, 21), (30, 31)):
        state = model.prepare(*inputs(built, answer))
        scores.append(component.score(state)[0])
    assert torch.equal(scores[0], scores[1])


def test_pruning_a_ragged_batch_equals_one_by_one():
    built = covipal(seed=3, reserve=0.3)
    model = built.model.eval()
    ids, mask = ragged_prompts(model, built.tokenizer)
    pixels = torch.randn(2, 3, 64, 64)
    generated, _, _ = model.generate(ids, mask, pixels, max_new_tokens=4)
    for b in range(2):
        prompt = ids[b, mask[b]][None]
        alone, _, _ = model.generate(prompt, torch.ones_like(prompt, dtype=torch.bool), pixels[b : b + 1], 4)
        assert torch.equal(alone[0], generated[b])
    state = model.prepare(ids, mask, pixels)
    kept = model.compressors[0].before_layer(0, state)
    assert kept.num_visual.tolist() == [20, 20]  # ⌈0.3 · 64⌉


def test_the_soft_mask_trains_the_scorer_under_the_lm_loss():
    built = covipal()
    model = built.model.train()
    ids, mask, pixels, labels = inputs(built)
    model.set_progress(Progress(0, 10, ("lm",)))
    soft = model(ids, mask, pixels, labels)
    assert soft.state.num_visual.tolist() == [64, 64]  # every token stays, down-weighted
    soft.loss.backward()
    assert model.compressors[0].query.weight.grad.abs().sum() > 0
    model.eval()
    hard = model(ids, mask, pixels, labels)
    assert hard.state.num_visual.tolist() == [16, 16]


def test_scorer_is_under_two_percent_of_the_7b_llm():
    built = build(
        "models/configs/llava-1.5-7b-hf",
        compressors=[ComponentSpec("covipal", {"guidance_layer": 16})],
        device="meta",
    )
    scorer = sum(p.numel() for p in built.model.compressors.parameters())
    llm = sum(p.numel() for p in built.model.llm.parameters())
    assert scorer / llm < 0.02, scorer / llm


@pytest.mark.parametrize(
    "params,key",
    [({"guidance_layer": 5}, "guidance_layer"), ({"reserve": 0.0}, "reserve"), ({"heads": 5}, "heads")],
)
def test_config_problems_name_the_key(params, key):
    from models.compressors.covipal import CoViPAL, CoViPALConfig

    dims = covipal().model.dims
    assert key in [k for k, _ in CoViPAL.check_config(CoViPALConfig(**params), dims)]


@pytest.mark.slow
def test_tiny_recipe_trains_and_evaluates_at_every_budget(tmp_path):
    """`tiny/covipal` trains its scorer from the frozen shipped base, and `vtc evaluate` measures
    the trained scorer at each asked token count (its class says how to hit a budget)."""
    from train.evaluate import Settings, evaluate
    from train.recipe import load_recipe
    from train.run import run_recipe

    overrides = [
        f"output={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.synthetic.train=64",
        "data.synthetic.test=4",
        "data.num_workers=0",
        "stages.0.steps=3",
        "stages.0.batch_size=4",
        "eval.limit=2",
    ]
    metrics = run_recipe(load_recipe("tiny/covipal", overrides))
    assert metrics["count"] == 2 * len(FAMILIES)  # every question of the 2 test images
    # all 64 enter the LLM; from layer 0 on each of its layers holds the 16 kept (reserve 25 %)
    assert metrics["visual_tokens"] == 64 and metrics["visual_tokens_layer_mean"] == 16
    report = evaluate(str(tmp_path / "run"), [], [32, 8], settings=Settings(limit=2, timing=False))
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("baseline", None), ("model", None), ("model", 32), ("model", 8)}
    layer_mean = {key: round(row["visual_tokens_layer_mean"]) for key, row in rows.items()}
    assert layer_mean == {("baseline", None): 64, ("model", None): 16, ("model", 32): 32, ("model", 8): 8}


def test_soft_mask_gradients_survive_llm_checkpointing():
    """The 7B end-to-end recipe checkpoints the frozen LLM (`vtc plan`: ~190 GiB per GPU
    without): the scorer's gradients through the soft mask are the same with it."""

    def scorer_gradients(checkpoint: bool) -> dict[str, torch.Tensor]:
        built = covipal()
        model = built.model.train()
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("compressors."))
        model.set_gradient_checkpointing(llm=checkpoint, vision=False)
        model.set_progress(Progress(0, 10, ("lm",)))
        model(*inputs(built)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = scorer_gradients(False), scorer_gradients(True)
    assert plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)
