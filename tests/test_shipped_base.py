"""The shipped tiny bases (models/pretrained/tiny-llava, and tiny-llava-8l with an 8-layer LLM):
their files are the ones their training runs wrote, they load with no training, and they answer
from the image, as their recorded metrics say."""

import io
import json
import shutil

import pytest
from PIL import Image

from data.errors import UserError
from data.synth import FAMILIES
from models.build import build
from models.pretrained import shipped_names, shipped_path, verify
from train.accuracy import QuestionSet, answer_prior, answer_questions, mean_prior, score, synthetic_questions
from train.datamodule import split_shards
from train.recipe import load_recipe, resolve_base

BASE = shipped_path("tiny-llava")
BASES = ["tiny-llava", "tiny-llava-8l"]


@pytest.mark.parametrize("base", BASES)
def test_the_tiny_base_is_shipped_with_its_record(base):
    assert base in shipped_names()
    path = shipped_path(base)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.json",
        "train-log.csv",
        "provenance.json",
    ):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 10 * 2**20
    provenance = json.loads((path / "provenance.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(provenance["sha256"])
    verify(path)  # the files are the run's (raises otherwise)


def test_a_changed_weight_file_is_refused(tmp_path):
    copy = tmp_path / "tiny-llava"
    shutil.copytree(BASE, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors is not the file its training run wrote"):
        verify(copy)
    from train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as refused:  # a recipe on it: one problem, said once
        load_recipe("tiny/smoke", [f"model.base={copy}"])
    assert "1 problem(s)" in str(refused.value) and str(refused.value).count("is not the file") == 1


def test_recipes_name_the_shipped_base():
    recipe = load_recipe("tiny/tokenpacker", check_machine=False)
    assert recipe.model.base == "tiny-llava" and resolve_base("tiny-llava") == str(BASE)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The first 40 test images of the base recipe's synthetic data (240 questions)."""
    recipe = load_recipe(
        BASE / "recipe.yaml", [f"data.cache_dir={tmp_path_factory.mktemp('data')}"], check_machine=False
    )
    test = split_shards(recipe.data, "test")
    return synthetic_questions(test, limit=40)


def accuracy_of(built, questions):
    answers = answer_questions(built.model, built.tokenizer, questions, 64, progress=False)
    return score(questions, answers)


@pytest.mark.parametrize("base", BASES)
def test_the_base_answers_as_recorded_and_from_the_image(sample, base):
    built = build(resolve_base(base))
    recorded = json.loads((shipped_path(base) / "metrics.json").read_text())
    got = accuracy_of(built, sample)
    # The recorded figure was measured on 500 test images; 40 of them agree within sampling error.
    assert abs(got["accuracy"] - recorded["accuracy"]) < 0.06, (got["accuracy"], recorded["accuracy"])
    assert got["accuracy"] == pytest.approx(recorded["sample_check"]["accuracy"], abs=0.01)
    prior = answer_prior(sample)
    chance = mean_prior(prior)
    assert got["accuracy"] > chance + 0.3
    # every family is learned, far above its answer prior
    for family in FAMILIES:
        assert got["per_family"][family] > prior[family] + 0.3, (
            family,
            got["per_family"][family],
            prior[family],
        )
    # With a black image the same questions fall to near the prior.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    blank = QuestionSet(sample.questions, lambda key: buffer.getvalue(), answer_of=sample.answer_of)
    assert accuracy_of(built, blank)["accuracy"] < chance + 0.15


@pytest.mark.parametrize("base", BASES)
def test_the_recorded_command_rebuilds_the_shipped_recipe(base):
    """provenance.json's `trained_by` is a command a fresh clone can run: the one `train.ship`
    derives from the recipe.yaml shipped beside the weights (tiny/base plus the overrides that give
    that recipe; the test below checks such a command rebuilds it), not a path of a machine's /tmp."""
    from train.recipe import RECIPES_DIR
    from train.ship import trained_by

    path = shipped_path(base)
    recorded = json.loads((path / "provenance.json").read_text())["trained_by"]
    assert recorded == trained_by(str(RECIPES_DIR / "tiny" / "base.yaml"), path / "recipe.yaml")


def test_shipping_records_the_command_that_trained_the_run(tmp_path):
    """meta.json keeps no command line: `train.ship` recovers the overrides by comparing the run's
    recipe.yaml with the recipe it names, and that command rebuilds the run's recipe."""
    from train.recipe import RECIPES_DIR, recipe_to_yaml
    from train.ship import trained_by

    source = str(RECIPES_DIR / "tiny" / "base.yaml")
    overrides = ["model.tiny.llm_layers=8", "stages.2.optim.lr=0.0005", "stages.1.train.vision=lora"]
    cache = f"data.cache_dir={tmp_path / 'data'}"  # where the data cache lived is not part of it
    run = load_recipe(source, [*overrides, cache], check_machine=False)
    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(run))
    command = trained_by(source, tmp_path / "recipe.yaml")
    assert command.startswith("vtc train tiny/base ")
    recovered = command.split()[3:]
    assert sorted(recovered) == sorted(overrides)
    assert load_recipe(source, [*recovered, cache], check_machine=False) == run
    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(load_recipe(source, [cache], check_machine=False)))
    assert trained_by(source, tmp_path / "recipe.yaml") == "vtc train tiny/base"
    gone = str(tmp_path / "deleted.yaml")  # a recipe file that no longer exists: the run's own copy
    assert trained_by(gone, tmp_path / "recipe.yaml") == f"vtc train {tmp_path / 'recipe.yaml'}"
