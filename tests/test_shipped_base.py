"""The shipped tiny base (models/pretrained/tiny-llava): its files are the ones its training run
wrote, it loads with no training, and it answers from the image, as its recorded metrics say."""

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


def test_the_tiny_base_is_shipped_with_its_record():
    assert "tiny-llava" in shipped_names()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.json",
        "train-log.csv",
        "provenance.json",
    ):
        assert (BASE / name).is_file(), name
    assert (BASE / "model.safetensors").stat().st_size <= 10 * 2**20
    provenance = json.loads((BASE / "provenance.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(provenance["sha256"])
    verify(BASE)  # the files are the run's (raises otherwise)


def test_a_changed_weight_file_is_refused(tmp_path):
    copy = tmp_path / "tiny-llava"
    shutil.copytree(BASE, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors is not the file its training run wrote"):
        verify(copy)


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


def test_the_base_answers_as_recorded_and_from_the_image(sample):
    built = build(resolve_base("tiny-llava"))
    recorded = json.loads((BASE / "metrics.json").read_text())
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
