"""Ship a trained base with vtc: copy a base run's llava-hf model into models/pretrained/NAME
with its recipe, metrics, training log and the SHA-256 of every file the run wrote.

    python -m train.ship checkpoints/tiny-base [--name tiny-llava]

A maintainer's step (the shipped tiny base was written by it); users name the result in a
recipe as `model.base: NAME`. The copy is checked against the run's own hashes, so the shipped
files are byte for byte the ones the training run produced.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from models.pretrained import SHIPPED_DIR, sha256, verify
from train.outputs import run_metadata
from train.recipe import RECIPES_DIR, load_recipe, recipe_to_yaml

SAMPLE_IMAGES = 40  # the test checks the shipped base's accuracy on this many test images


def training_log(run_dir: Path) -> str:
    """Every stage's metrics.csv as one CSV with a `stage` column (stages in training order)."""
    meta = json.loads((run_dir / "meta.json").read_text())
    rows, fields = [], ["stage"]
    for stage in meta["stages"]:
        with (run_dir / "logs" / stage["name"] / "metrics.csv").open(newline="") as file:
            for row in csv.DictReader(file):
                rows.append({"stage": stage["name"], **row})
                fields += [k for k in row if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def sample_check(model_dir: Path, recipe_path: Path) -> dict:
    """Accuracy of the model on the first SAMPLE_IMAGES test images (what the test re-measures)."""
    from models.build import build
    from train.accuracy import answer_questions, score, synthetic_questions
    from train.datamodule import split_shards

    recipe = load_recipe(recipe_path, check_machine=False)
    built = build(str(model_dir))
    questions = synthetic_questions(split_shards(recipe.data, "test"), SAMPLE_IMAGES)
    size = built.hf.config.vision_config.image_size
    result = score(questions, answer_questions(built.model, built.tokenizer, questions, size, progress=False))
    return {"images": SAMPLE_IMAGES, "accuracy": result["accuracy"], "per_family": result["per_family"]}


def flat_items(node, prefix: str = "") -> dict:
    """{"a.b.0.c": value} for every leaf of nested dicts and lists (override paths)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node:
        items = enumerate(node)
    else:
        return {prefix: node}
    out = {}
    for key, value in items:
        out.update(flat_items(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def trained_by(recipe_source: str, run_recipe: Path) -> str:
    """The command that trained the run: its recipe as `vtc train` names it, plus the overrides
    that make that recipe the run's own recipe.yaml (meta.json does not record the command line,
    so they are recovered by difference; where the data cache lived is left out)."""
    path = Path(recipe_source)
    if not path.is_file():  # trained from a recipe that is gone: its copy in the run is the recipe
        return f"vtc train {run_recipe}"
    name = (
        str(path.relative_to(RECIPES_DIR).with_suffix(""))
        if path.is_relative_to(RECIPES_DIR)
        else recipe_source
    )
    ran = flat_items(yaml.safe_load(run_recipe.read_text()))
    named = flat_items(yaml.safe_load(recipe_to_yaml(load_recipe(recipe_source, check_machine=False))))
    overrides = [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"  # YAML reads JSON back
        for key, value in ran.items()
        if key != "data.cache_dir" and named.get(key) != value
    ]
    return " ".join(["vtc train", name, *overrides])


def ship(run_dir: Path, name: str) -> Path:
    from train.accuracy import answer_prior, synthetic_questions
    from train.datamodule import split_shards

    hf = run_dir / "hf"
    if not (hf / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no llava-hf model (hf/): train a base recipe first")
    written = {p.name: sha256(p) for p in sorted(hf.iterdir()) if p.is_file()}
    target = SHIPPED_DIR / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=SHIPPED_DIR))
    for file in written:
        shutil.copy2(hf / file, tmp / file)
    shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")
    recipe = load_recipe(run_dir / "recipe.yaml", check_machine=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["answer_prior"] = answer_prior(
        synthetic_questions(split_shards(recipe.data, "test"), recipe.eval.limit)
    )
    metrics["sample_check"] = sample_check(tmp, run_dir / "recipe.yaml")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (tmp / "train-log.csv").write_text(training_log(run_dir))
    meta = json.loads((run_dir / "meta.json").read_text())
    provenance = {
        "name": name,
        "trained_by": trained_by(meta["recipe"], run_dir / "recipe.yaml"),
        "run": str(run_dir),
        "stages": meta["stages"],
        "versions": meta.get("versions"),
        "git_commit": meta.get("git_commit"),
        "shipped_with": run_metadata(recipe.source, []).get("versions"),
        "sha256": written,  # of the files as the training run wrote them (hf/)
    }
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    verify(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished base run (with hf/, metrics.json, meta.json)")
    parser.add_argument("--name", default="tiny-llava", help="the base's name in recipes (model.base)")
    args = parser.parse_args()
    target = ship(args.run_dir, args.name)
    size = sum(p.stat().st_size for p in target.iterdir())
    print(
        f"shipped {args.run_dir} as {target} ({size / 2**20:.1f} MiB); recipes use it as model.base: {args.name}"
    )


if __name__ == "__main__":
    main()
