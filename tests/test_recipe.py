"""Recipes: every shipped recipe validates and builds; bad recipes name file and key."""

import copy
import dataclasses

import pytest
import yaml

from train.recipe import RECIPES_DIR, RecipeError, load_recipe, recipe_from_dict

SHIPPED = sorted(RECIPES_DIR.rglob("*.yaml"))

GOOD = {
    "description": "test",
    "output": "checkpoints/test",
    "model": {"base": "tiny", "projector": {"name": "mlp2x_gelu"}},
    "stages": [{"name": "s", "steps": 2, "train": {"llm": "full"}}],
}


def with_change(path: str, value):
    raw = copy.deepcopy(GOOD)
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()
BAD = [
    ("unknown top key", with_change("modle", {}), "modle", "did you mean 'model'"),
    ("unknown nested key", with_change("stages.0.lr", 1e-3), "stages[0].lr", "unknown key"),
    ("wrong type", with_change("stages.0.batch_size", "big"), "stages[0].batch_size", "expected int"),
    ("bool is not int", with_change("seed", True), "seed", "expected int"),
    (
        "bad literal",
        with_change("stages.0.train", {"llm": "lorra"}),
        "stages[0].train.llm",
        "did you mean 'lora'",
    ),
    ("missing required", with_change("output", DELETE), "output", "required key is missing"),
    (
        "unknown component",
        with_change("model.projector", {"name": "tokenpakcer"}),
        "model.projector.name",
        "unknown component",
    ),
    (
        "component param",
        with_change("model.compressors", [{"name": "avgpool2d", "strid": 2}]),
        "model.compressors[0].strid",
        "unknown key",
    ),
    (
        "param check",
        with_change("model.compressors", [{"name": "avgpool2d", "stride": 3}]),
        "model.compressors[0].stride",
        "divide",
    ),
    (
        "projector in compressors",
        with_change("model.compressors", [{"name": "mlp2x_gelu"}]),
        "model.compressors[0].name",
        "is a projector",
    ),
    (
        "pre_llm as projector",
        with_change("model.projector", {"name": "avgpool2d"}),
        "model.projector.name",
        "not a projector",
    ),
    ("steps and epochs", with_change("stages.0.epochs", 1.0), "stages[0]", "exactly one of steps or epochs"),
    (
        "all frozen",
        with_change("stages.0.train", {"projector": "frozen", "compressors": "frozen"}),
        "stages[0].train",
        "nothing would train",
    ),
    (
        "lora projector",
        with_change("stages.0.train", {"projector": "lora"}),
        "stages[0].train",
        "LoRA is for",
    ),
    (
        "global batch",
        with_change("stages.0.global_batch_size", 10),
        "stages[0].global_batch_size",
        "not a multiple",
    ),
    (
        "deepspeed on cpu",
        with_change("trainer", {"strategy": "deepspeed_stage_3"}),
        "trainer.strategy",
        "needs CUDA",
    ),
    ("missing base dir", with_change("model.base", "/nonexistent/llava"), "model.base", "llava-hf directory"),
    ("no stages", with_change("stages", []), "stages", "at least one stage"),
    (
        "region on real data",
        with_change("data", {"synthetic": None, "train_shards": "/nonexistent"}),
        "data.train_shards",
        "does not exist",
    ),
]


@pytest.mark.parametrize("name,raw,key,message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_names_file_and_key(name, raw, key, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "bad.yaml")
    text = str(info.value)
    assert text.startswith("bad.yaml:")
    assert any(p.key == key and message in p.message for p in info.value.problems), text


def test_all_problems_reported_together():
    raw = with_change("stages.0.batch_size", "big")
    raw["seed"] = "x"
    raw["stages"][0]["stepz"] = 1
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "bad.yaml")
    assert {p.key for p in info.value.problems} >= {"seed", "stages[0].batch_size", "stages[0].stepz"}


def test_overrides_apply_and_bad_overrides_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    recipe = load_recipe(path, ["stages.0.steps=7", "trainer.devices=2", "stages.0.optim.lr=3e-4"])
    assert recipe.stages[0].steps == 7 and recipe.trainer.devices == 2 and recipe.stages[0].optim.lr == 3e-4
    with pytest.raises(RecipeError, match="stages.5"):
        load_recipe(path, ["stages.5.steps=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["nonsense"])


def test_recipe_is_frozen():
    recipe = recipe_from_dict(copy.deepcopy(GOOD))
    with pytest.raises(AttributeError):
        recipe.seed = 3


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="broken.yaml"):
        load_recipe(path)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(RECIPES_DIR)) for p in SHIPPED])
def test_every_shipped_recipe_validates_and_builds(path):
    """Tiny recipes build for real (on the shipped base with its weights; a `run:` base as the
    tiny architecture it was trained from); recipes on a real base build on the meta device from
    its config (no weights)."""
    from models.build import build
    from models.pretrained import shipped_names
    from train.recipe import resolve_base

    recipe = load_recipe(path, check_machine=False)
    base = recipe.model.base
    device = None
    if base.startswith("run:") or base == "tiny":
        base = "tiny"
    elif base in shipped_names():
        base = resolve_base(base)
    else:
        base, device = resolve_base(base), "meta"
    built = build(
        base,
        recipe.model.projector,
        recipe.model.compressors,
        tiny=recipe.model.tiny,
        device=device,
        views=recipe.model.views,
    )
    assert built.model.visual_tokens() > 0


def test_parsing_leaves_the_callers_dict_alone_and_rejects_non_mappings():
    raw = copy.deepcopy(GOOD)
    recipe_from_dict(raw, "r.yaml", ["stages.0.steps=9"])
    assert raw == GOOD
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        recipe_from_dict(["not", "a", "mapping"], "list.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(RECIPES_DIR)) for p in SHIPPED])
def test_resolved_recipe_yaml_loads_back_equal(path, tmp_path):
    from train.recipe import recipe_to_yaml

    recipe = load_recipe(path, check_machine=False)
    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    again = load_recipe(tmp_path / "recipe.yaml", check_machine=False)
    assert dataclasses.replace(again, source=recipe.source) == recipe
