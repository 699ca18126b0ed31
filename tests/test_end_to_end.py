"""The real training path, end to end, on the shipped smoke recipe."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from data.synth import FAMILIES
from train.cli import main


def stage_losses(run_dir, stage):
    rows = list(csv.DictReader(open(run_dir / "logs" / stage / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_vtc_train_smoke_recipe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "tiny/smoke",
                f"output={run_dir}",
                f"data.cache_dir={tmp_path / 'data'}",
                "stages.1.steps=30",
                "wandb.enabled=true",
                "wandb.mode=offline",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[TRAINABLE]" in out and "[Frozen]" in out and "held-out accuracy" in out
    assert "questions; 64 visual tokens into the LLM)" in out  # no pruning inside it: no layer mean
    losses = stage_losses(run_dir, "instruct")
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["per_family"]) == set(FAMILIES)
    # the evaluation ran every question of the 8 test images, the mean is over families
    assert metrics["count"] == 8 * len(FAMILIES) and metrics["visual_tokens"] == 64
    assert metrics["visual_tokens_layer_mean"] == 64
    assert metrics["accuracy"] == pytest.approx(sum(metrics["per_family"].values()) / len(FAMILIES))
    assert set(metrics["answer_prior"]) == set(metrics["per_family"])
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "trainable.safetensors").is_file()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [(s["name"], s["steps"], s["samples_seen"]) for s in meta["stages"]] == [
        ("vision", 4, 64),
        ("instruct", 30, 240),
    ]
    for stage in meta["stages"]:  # each stage's throughput, recorded and printed
        rate = stage["samples_per_second"]
        # the steps after the first, as timed, fit in the stage's wall time
        assert (
            rate > 0
            and (stage["steps"] - 1) * stage["samples_seen"] / stage["steps"] / rate <= stage["seconds"] + 0.1
        )
        assert (
            f"[vtc] stage {stage['name']!r}: {stage['steps']} steps in" in out
            and f"{rate:.1f} samples/s" in out
        )
    assert meta["versions"]["torch"].startswith("2.13")
    assert (run_dir / "hf" / "config.json").is_file()  # the base is saved in llava-hf layout
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
    # The saved base loads back and gives the model that was evaluated.
    from models.build import build

    rebuilt = build(str(run_dir / "hf"))
    assert rebuilt.model.visual_tokens() == 64 and rebuilt.tokenizer is not None


def test_cli_help_and_recipes(capsys):
    out = subprocess.run([sys.executable, "-m", "train.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "validate" in out.stdout and "examples:" in out.stdout
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "tiny/base" in listed and "tiny/smoke" in listed
    # one column of descriptions, however long the longest name
    lines = listed.splitlines()
    assert len({len(line) - len(line.split(maxsplit=1)[1]) for line in lines}) == 1
    with pytest.raises(SystemExit) as version:  # argparse's version action exits
        main(["--version"])
    said = capsys.readouterr().out
    assert version.value.code == 0 and said.startswith("vtc ") and f"torch {torch.__version__}" in said


def test_every_cli_argument_has_help():
    import argparse

    from train.cli import build_parser

    def commands(parser, path=("vtc",)):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*path, name))

    bare = [
        f"{' '.join(path)} {action.option_strings[-1] if action.option_strings else action.dest}"
        for path, parser in commands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert not bare, f"arguments without help: {bare}"


def test_cli_validate_reports_bad_key(capsys):
    assert main(["validate", "tiny/smoke", "stages.0.stepz=2"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].stepz" in err and "smoke.yaml" in err


def test_overrides_may_follow_a_flag(capsys):
    from train.cli import parse_command_line

    args = parse_command_line(["train", "tiny/smoke", "stages.0.steps=2", "--restart", "seed=3"])
    assert args.restart and args.recipe == "tiny/smoke"
    assert args.overrides == ["stages.0.steps=2", "seed=3"]
    args = parse_command_line(["resume", "runs/x", "--force", "trainer.log_every=1"])
    assert args.force and args.overrides == ["trainer.log_every=1"]
    # anything else after a flag is still refused, and so is key=value where no overrides are taken
    for argv in (["train", "tiny/smoke", "--restart", "--bogus"], ["recipes", "seed=3"]):
        with pytest.raises(SystemExit) as stop:
            parse_command_line(argv)
        assert stop.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_models_do_not_import_the_training_stack():
    code = (
        "import sys, models, models.build, models.llava, models.compressors, models.region_head, models.export, models.flops;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'deepspeed', 'wandb') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_writes_no_weights(tmp_path):
    from train.recipe import load_recipe
    from train.run import run_recipe

    run_dir = tmp_path / "nan"
    recipe = load_recipe(
        "tiny/smoke",
        [
            f"output={run_dir}",
            f"data.cache_dir={tmp_path / 'data'}",
            "stages.1.optim.lr=1e30",
            "stages.1.optim.grad_clip=null",
            "checkpoint.every=1",
            "checkpoint.keep_last=100",
        ],
    )
    from data.errors import UserError

    with pytest.raises(UserError, match=r"non-finite (loss .* at step \d+ of stage 'instruct'|trainable)"):
        run_recipe(recipe)
    assert not (run_dir / "trainable.safetensors").exists() and not (run_dir / "hf").exists()
    # every checkpoint written before the stop holds finite weights; the newest is the last good one
    from safetensors.torch import load_file

    from train.checkpoint import list_checkpoints

    saved = list_checkpoints(run_dir)
    assert saved and saved[-1].stage == "instruct"
    for ckpt in saved:
        weights = load_file(str(ckpt.path / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.path.name
