"""Trainable weights: saved as safetensors keyed `part.name`, loaded back by `model.init`."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.errors import UserError
from models.build import ComponentSpec, build
from tests.conftest import TEST_TINY
from train.run import load_trainables, save_trainables


def names_under(model, *parts: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.split(".")[0] in parts}


def test_save_then_init_restores_exactly_the_trained_parts(tmp_path):
    trained = build("tiny", tiny=TEST_TINY, seed=1).model
    save_trainables(trained, names_under(trained, "projector", "llm"), tmp_path)
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "trainable.safetensors"))} == {
        "projector",
        "llm",
    }
    fresh = build("tiny", tiny=TEST_TINY, seed=2).model
    assert load_trainables(fresh, str(tmp_path))  # the names it loaded
    for part in ("projector", "llm"):
        for (name, a), (_, b) in zip(
            getattr(trained, part).named_parameters(),
            getattr(fresh, part).named_parameters(),
            strict=True,
        ):
            assert torch.equal(a, b), f"{part}.{name}"
    # The vision tower was not saved, so it keeps its own (different) initialisation.
    assert not torch.equal(next(trained.vision.parameters()), next(fresh.vision.parameters()))


def test_init_errors_are_clear(tmp_path):
    model = build("tiny", tiny=TEST_TINY).model
    with pytest.raises(FileNotFoundError, match="no trainable weights"):
        load_trainables(model, str(tmp_path))
    save_file({"projector.nonexistent.weight": torch.zeros(1)}, str(tmp_path / "trainable.safetensors"))
    with pytest.raises(UserError, match="does not fit this model: weights this model lacks"):
        load_trainables(model, str(tmp_path))
    with (tmp_path / "trainable.safetensors").open("r+b") as file:
        file.truncate(20)  # cut short, as a partial copy leaves it
    with pytest.raises(
        UserError, match=r"trainable.safetensors cannot be read \(SafetensorError: .*cut short\?"
    ):
        load_trainables(model, str(tmp_path))


def test_tokenpacker_weights_round_trip(tmp_path):
    model = build("tiny", projector=ComponentSpec("tokenpacker", {"scale": 2}), tiny=TEST_TINY, seed=1).model
    save_trainables(model, names_under(model, "projector"), tmp_path)
    other = build("tiny", projector=ComponentSpec("tokenpacker", {"scale": 2}), tiny=TEST_TINY, seed=5).model
    load_trainables(other, str(tmp_path))
    features = model.vision(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(model.projector.eval()(features), other.projector.eval()(features))
