"""Method losses, objectives and training progress: the core mechanisms a method plugs into."""

import csv

import pytest
import torch
from safetensors.torch import load_file

import tests.components as components
from models.build import ComponentSpec, build
from tests.conftest import TEST_TINY, ragged_prompts
from train.objectives import OBJECTIVES, weighted_total
from train.recipe import RecipeError, load_recipe
from train.run import run_recipe


def batch_for(model, tokenizer):
    """Two right-padded samples, one image each, the answer tokens labelled."""
    ids, mask = ragged_prompts(model, tokenizer)
    labels = ids.masked_fill(~mask, -100)
    labels[:, :3] = -100
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, 64, 64),
        "labels": labels,
    }


def scorer_model():
    return build(
        "tiny", compressors=[ComponentSpec("test_scorer", {"keep": 4})], tiny=TEST_TINY, seed=0
    ).model


def test_aux_objective_trains_the_component_from_its_own_loss_only(tokenizer):
    model = scorer_model()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.compressors.parameters():
        p.requires_grad_(True)
    terms = OBJECTIVES["aux"].terms(model, batch_for(model, tokenizer))
    assert "lm" not in terms and set(terms) == {"scorer_mse", "visual_tokens"}
    weighted_total(terms, {}).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("compressors."))
    assert model.compressors[0].score.weight.grad.abs().sum() > 0


def test_lm_plus_aux_weights_each_term(tokenizer):
    model = scorer_model()
    batch = batch_for(model, tokenizer)
    terms = OBJECTIVES["lm+aux"].terms(model, batch)
    assert {"lm", "scorer_mse"} <= set(terms)
    total = weighted_total(terms, {"scorer_mse": 0.25})
    assert torch.allclose(total, terms["lm"] + 0.25 * terms["scorer_mse"])
    out = model(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"], per_sample=True
    )
    assert out.sample_loss.shape == (2,) and torch.allclose(out.sample_loss.mean(), out.loss, atol=0.3)
    # per-sample means weight samples equally; the batch loss weights tokens (4 vs 2 targets)
    tokens = torch.tensor([3.0, 1.0])
    assert torch.allclose((out.sample_loss * tokens).sum() / tokens.sum(), out.loss, atol=1e-5)


def smoke(tmp_path, *overrides):
    return load_recipe(
        "tiny/smoke",
        [f"output={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}", "stages.0.steps=2", *overrides],
    )


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["stages.1.objective=aux"], "stages[1].objective", "none of mlp2x_gelu declares any"),
        (
            [
                "model.compressors=[{name: test_scorer}]",
                "stages.1.objective=aux",
                "stages.1.train.compressors=frozen",
            ],
            "stages[1].train.compressors",
            "no gradient would reach",
        ),
        (["stages.1.objective=lm+aux2"], "stages[1].objective", "did you mean 'lm+aux'"),
        (
            ["stages.1.loss_weights={lm: 1.0, router_ce: 0.5}"],
            "stages[1].loss_weights.router_ce",
            "its terms: lm",
        ),
    ],
)
def test_objective_problems_are_recipe_errors(tmp_path, overrides, key, message):
    with pytest.raises(RecipeError) as err:
        smoke(tmp_path, *overrides)
    assert f"{key}: " in str(err.value) and message in str(err.value)


def logged(run_dir, stage, column):
    rows = list(csv.DictReader(open(run_dir / "logs" / stage / "metrics.csv")))
    return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("objectives-data")  # the runs below share their synthetic data


@pytest.mark.slow
def test_an_aux_stage_on_a_schedule_resumes_mid_schedule_exactly(tmp_path, data_dir):
    """An `aux` stage with the LLM frozen trains the scorer from its own loss (logged per term,
    no LLM weight saved), while a scheduled component follows the global step: an uninterrupted
    run and one that crashes before step 7 and resumes from its step-5 checkpoint log the same
    schedule at every step and end with bit-identical weights."""
    overrides = [
        f"data.cache_dir={data_dir}",
        "model.compressors=[{name: test_scheduled_keep, start: 16, end: 4}, {name: test_scorer, keep: 3}]",
        "stages.1.objective=aux",
        "stages.1.train={vision: frozen, projector: frozen, compressors: full, llm: frozen}",
        "stages.1.steps=12",
        "checkpoint.every=5",
        "eval.limit=2",
    ]
    run_recipe(smoke(tmp_path / "a", *overrides))
    run_dir = tmp_path / "a" / "run"
    mse = logged(run_dir, "instruct", "train/scorer_mse")
    assert len(mse) >= 10 and "train/lm" not in open(run_dir / "logs" / "instruct" / "metrics.csv").readline()
    assert sum(list(mse.values())[-3:]) < sum(list(mse.values())[:3])  # it learns
    saved = load_file(str(run_dir / "trainable.safetensors"))
    assert any(k.startswith("compressors.") for k in saved) and not any(k.startswith("llm.") for k in saved)
    keep = logged(run_dir, "instruct", "schedule/test_scheduled_keep.keep")
    assert keep[0] == 16 and keep[11] == 5 and list(keep.values()) == sorted(keep.values(), reverse=True)

    crashed = smoke(tmp_path / "b", *overrides)
    components.CRASH_AT_STEP[:] = [7]
    try:
        with pytest.raises(RuntimeError, match="simulated crash before step 7"):
            run_recipe(crashed)
    finally:
        components.CRASH_AT_STEP[:] = []
    run_recipe(crashed, resume="auto")
    assert logged(tmp_path / "b" / "run", "instruct", "schedule/test_scheduled_keep.keep") == keep
    a, b = (load_file(str(d / "run" / "trainable.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
