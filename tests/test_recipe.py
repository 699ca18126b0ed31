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
    (
        # DeepSpeed would move the routers a step did not draw (tests/test_zero.py -k every_method)
        "one router per step under deepspeed",
        {
            **with_change("trainer", {"strategy": "deepspeed_stage_2", "accelerator": "gpu"}),
            "model": {
                "base": "tiny",
                "projector": {"name": "mlp2x_gelu"},
                "compressors": [{"name": "dyvte"}],
            },
            "stages": [
                {
                    "name": "r",
                    "steps": 2,
                    "objective": "aux",
                    "train": {"projector": "frozen", "compressors": "full"},
                }
            ],
        },
        "stages[0].train.compressors",
        "use trainer.strategy: ddp",
    ),
    (
        "float16 weights under 16-mixed off deepspeed",
        {
            **with_change("trainer", {"precision": "16-mixed", "accelerator": "gpu"}),
            "model": {**GOOD["model"], "dtype": "float16"},
        },
        "model.dtype",
        "Attempting to unscale FP16 gradients",
    ),
    ("missing base dir", with_change("model.base", "/nonexistent/llava"), "model.base", "llava-hf directory"),
    ("no stages", with_change("stages", []), "stages", "at least one stage"),
    (
        "region on real data",
        with_change("data", {"synthetic": None, "train_shards": "/nonexistent"}),
        "data.train_shards",
        "does not exist",
    ),
    # values that used to validate and then crash `vtc train`
    ("negative steps", with_change("stages.0.steps", -5), "stages[0].steps", "must be ≥ 1"),
    ("zero epochs", with_change("stages", [{"name": "s", "epochs": 0}]), "stages[0].epochs", "must be > 0"),
    ("batch size 0", with_change("stages.0.batch_size", 0), "stages[0].batch_size", "must be ≥ 1"),
    ("global batch 0", with_change("stages.0.global_batch_size", 0), "stages[0].global_batch_size", "≥ 1"),
    ("devices 0", with_change("trainer.devices", 0), "trainer.devices", "must be ≥ 1"),
    ("nodes 0", with_change("trainer.num_nodes", 0), "trainer.num_nodes", "must be ≥ 1"),
    ("negative threads", with_change("trainer.threads", -2), "trainer.threads", "must be ≥ 1"),
    ("log every 0", with_change("trainer.log_every", 0), "trainer.log_every", "must be ≥ 1"),
    ("lr 0", with_change("stages.0.optim", {"lr": 0}), "stages[0].optim.lr", "must be > 0"),
    ("lr nan", with_change("stages.0.optim", {"lr": float("nan")}), "stages[0].optim.lr", "must be > 0"),
    (
        "negative wd",
        with_change("stages.0.optim", {"weight_decay": -0.1}),
        "stages[0].optim.weight_decay",
        "≥ 0",
    ),
    ("warmup past 1", with_change("stages.0.optim", {"warmup": 1.5}), "stages[0].optim.warmup", "[0, 1]"),
    (
        "betas of 1",
        with_change("stages.0.optim", {"betas": [0.9, 1.0]}),
        "stages[0].optim.betas[1]",
        "[0, 1)",
    ),
    ("one beta", with_change("stages.0.optim", {"betas": [0.9]}), "stages[0].optim.betas", "list of 2"),
    ("grad clip 0", with_change("stages.0.optim", {"grad_clip": 0}), "stages[0].optim.grad_clip", "> 0"),
    ("lora dropout 1", with_change("stages.0.lora", {"dropout": 1.0}), "stages[0].lora.dropout", "[0, 1)"),
    ("lora rank 0", with_change("stages.0.lora", {"r": 0}), "stages[0].lora.r", "must be ≥ 1"),
    (
        "negative loss weight",
        with_change("stages.0.loss_weights", {"lm": -1}),
        "stages[0].loss_weights.lm",
        "≥ 0",
    ),
    ("max length 0", with_change("data.max_length", 0), "data.max_length", "must be ≥ 1"),
    ("negative workers", with_change("data.num_workers", -1), "data.num_workers", "must be ≥ 0"),
    ("no training samples", with_change("data.synthetic", {"train": 0}), "data.synthetic.train", "≥ 1"),
    ("checkpoint every 0", with_change("checkpoint.every", 0), "checkpoint.every", "must be ≥ 1"),
    ("keep no checkpoint", with_change("checkpoint.keep_last", 0), "checkpoint.keep_last", "must be ≥ 1"),
    ("eval limit 0", with_change("eval.limit", 0), "eval.limit", "must be ≥ 1"),
    ("eval new tokens 0", with_change("eval.max_new_tokens", 0), "eval.max_new_tokens", "must be ≥ 1"),
    ("empty output", with_change("output", " "), "output", "must name the run directory"),
    (
        "shards without test data",
        with_change("data", {"synthetic": None, "train_shards": "."}),
        "data.test_shards",
        "eval.after_training: false",
    ),
    (
        "stage name with a slash",
        with_change("stages.0.name", "a/b"),
        "stages[0].name",
        "it names files",
    ),
    ("negative seed", with_change("seed", -1), "seed", "must be in [0, 4.29497e+09]"),
    ("grid past h8", with_change("data.synthetic", {"grid": 9}), "data.synthetic.grid", "[1, 8]"),
    (
        "cells under 4 px",
        with_change("data.synthetic", {"image_size": 12}),
        "data.synthetic.image_size",
        "4 px per cell",
    ),
    (
        "fewest objects above most",
        with_change("data.synthetic", {"objects": [6, 4]}),
        "data.synthetic.objects",
        "fewest 6 is more than most 4",
    ),
    (
        "more objects than cells",
        with_change("data.synthetic", {"grid": 4, "objects": [3, 16]}),
        "data.synthetic.objects",
        "need 17 cells; a 4×4 grid has 16",
    ),
    (
        "only training lookups asked",
        with_change("data.synthetic", {"families": ["cell", "where"]}),
        "data.synthetic.families",
        "name at least one scored family",
    ),
    (
        "unknown family",
        with_change("data.synthetic", {"families": ["matches"]}),
        "data.synthetic.families[0]",
        "did you mean 'match'",
    ),
    ("all weights 0", with_change("stages.0.loss_weights", {"lm": 0}), "stages[0].loss_weights", "weight 0"),
    (
        "region grid",
        with_change("stages", [{"name": "v", "steps": 1, "objective": "region", "train": {"vision": "full"}}])
        | {"data": {"synthetic": {"grid": 3}}},
        "data.synthetic.grid",
        "divide the 8×8 patch grid",
    ),
    (
        "two stages, one name",
        with_change("stages", [{"name": "s", "steps": 1}, {"name": "s", "steps": 1}]),
        "stages[1].name",
        "also the name of stages[0]",
    ),
    (
        "chat without a chat template",
        with_change("stages.0.template", "chat"),
        "stages[0].template",
        "has no chat template; give model.chat_template",
    ),
    (
        "system prompt without a chat stage",
        with_change("model.system_prompt", "Be brief."),
        "model.system_prompt",
        "only stages with template: chat use it",
    ),
    (
        "chat template file missing",
        with_change("model.chat_template", "no/such.jinja")
        | {"stages": [dict(GOOD["stages"][0], template="chat")]},
        "model.chat_template",
        "no such Jinja file",
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


def test_a_type_error_does_not_hide_the_combination_checks():
    raw = with_change("stages.0.batch_size", "big")
    raw["model"]["compressors"] = [{"name": "mlp2x_gelu"}]  # a projector among compressors
    raw["trainer"] = {"threads": 0}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "bad.yaml")
    keys = {p.key for p in info.value.problems}
    assert keys == {"stages[0].batch_size", "model.compressors[0].name", "trainer.threads"}


def test_a_bad_value_is_not_reported_twice_through_a_combination():
    # steps: -1 falls back to its default (None) while the stage is checked; "give exactly one
    # of steps or epochs" would only repeat the real problem
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(with_change("stages.0.steps", -1), "bad.yaml")
    assert [p.key for p in info.value.problems] == ["stages[0].steps"]


def test_duplicate_keys_in_a_recipe_file_are_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(GOOD) + "seed: 1\nseed: 2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "twice.yaml" in str(info.value) and "'seed' appears twice" in str(info.value)


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    for output in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(RecipeError) as info:
            recipe_from_dict(with_change("output", str(output)), "bad.yaml")
        assert [p.key for p in info.value.problems] == ["output"]
        recipe_from_dict(with_change("output", str(output)), "bad.yaml", check_machine=False)  # --anywhere


def test_overrides_apply_and_bad_overrides_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    recipe = load_recipe(path, ["stages.0.steps=7", "trainer.devices=2", "stages.0.optim.lr=3e-4"])
    assert recipe.stages[0].steps == 7 and recipe.trainer.devices == 2 and recipe.stages[0].optim.lr == 3e-4
    with pytest.raises(RecipeError, match="stages.5"):
        load_recipe(path, ["stages.5.steps=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["nonsense"])
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages.0.steps=[10"])
    assert info.value.problems[0].key == "stages.0.steps" and "not valid YAML" in str(info.value)


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


def test_the_model_answers_in_its_last_instruction_template(tmp_path):
    """Evaluation and export prompt a model in the last non-plain template its stages trained."""
    from train.recipe import model_template, stage_templates

    jinja = tmp_path / "chat.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}</s>{% endfor %}")
    raw = copy.deepcopy(GOOD)
    raw["model"] |= {"system_prompt": "Be brief.", "chat_template": str(jinja)}
    raw["stages"] = [
        {"name": "align", "steps": 1, "template": "plain", "train": {"projector": "full"}},
        {"name": "tune", "steps": 1, "template": ["plain", "chat"], "train": {"llm": "full"}},
    ]
    recipe = recipe_from_dict(raw, "chat.yaml")
    made = model_template(recipe)
    assert (made.name, made.system, made.jinja) == ("chat", "Be brief.", jinja.read_text())
    assert [t.name for t in stage_templates(recipe.stages[1], recipe.model)] == ["plain", "chat"]
    plain_only = recipe_from_dict(
        {**GOOD, "stages": [dict(GOOD["stages"][0], template="plain")]}, "plain.yaml"
    )
    assert model_template(plain_only).name == "vicuna_v1"  # as every evaluation prompted before
