"""The main job: `vtc train` with no recipe trains TokenPacker on the shipped tiny base and
compares it with the base and training-free baselines at its own token count."""

import json

import pytest

from data.synth import FAMILIES
from train.cli import main
from train.recipe import DEFAULT_RECIPE, load_recipe


def test_the_default_recipe_is_tokenpacker_on_the_shipped_base():
    recipe = load_recipe(DEFAULT_RECIPE, check_machine=False)
    assert recipe.model.projector.name == "tokenpacker" and recipe.model.base == "tiny-llava"
    assert recipe.model.projector.params == {"scale": 2, "warm_start": True}
    assert {"pooling", "random", "divprune"} <= set(recipe.eval.baselines)


def test_an_unknown_comparison_baseline_names_the_key(capsys):
    assert main(["validate", "tiny/tokenpacker", "eval.baselines=[pooling,poolin]"]) == 2
    err = capsys.readouterr().err
    assert "eval.baselines.1" in err and "unknown baseline 'poolin'" in err


@pytest.mark.slow
def test_vtc_train_without_a_recipe_trains_then_compares(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [
        f"output={run_dir}",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.synthetic.train=64",
        "data.synthetic.test=6",
        "stages.0.steps=2",
        "stages.0.batch_size=4",
        "eval.limit=6",
        "eval.compare_limit=6",
        "eval.compare_timing=false",
    ]
    assert main(["train", *overrides]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "pooling@16" in out and "prior" in out
    report = json.loads((run_dir / "eval.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert ("baseline", None) in rows and ("model", None) in rows
    for label in ("pooling", "random", "divprune", "visionzip"):
        assert rows[(label, 16)]["visual_tokens"] == 16, label
    assert rows[("baseline", None)]["visual_tokens"] == 64 and rows[("model", None)]["visual_tokens"] == 16
    assert set(report["answer_prior"]) == set(FAMILIES)
    assert "answer prior" in (run_dir / "eval.md").read_text()
    assert (run_dir / "eval.png").stat().st_size > 10_000
