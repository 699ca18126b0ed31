"""Bases shipped with vtc: small LLaVA models trained once by vtc's own recipes, in llava-hf
layout, so that a recipe can start from a model that already looks at the image (as a real user
starts from `llava-1.5-7b-hf`) instead of training one first.

`model.base: tiny-llava` names `models/pretrained/tiny-llava/`. Beside the weights each base
keeps `recipe.yaml` (what trained it: `vtc train tiny/base` reproduces it), `metrics.json`
(its held-out accuracy, per family, with each family's answer prior), `train-log.csv` (loss per
logged step of every stage) and `provenance.json` with the SHA-256 of every file the training
run wrote; `verify` checks the files against it before the base is used, so a truncated copy or
a Git LFS pointer is refused with a clear error instead of loading wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_names() -> list[str]:
    return sorted(p.parent.name for p in SHIPPED_DIR.glob("*/provenance.json"))


def shipped_path(name: str) -> Path | None:
    """The folder of shipped base `name`, or None if vtc ships no base of that name."""
    path = SHIPPED_DIR / name
    return path if (path / "provenance.json").is_file() else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Raise ValueError naming the file if a shipped base's files differ from the recorded ones."""
    recorded = json.loads((path / "provenance.json").read_text())["sha256"]
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"shipped base {path.name}: {file} is missing (reinstall vtc)")
        if sha256(file) != expected:
            raise UserError(
                f"shipped base {path.name}: {file} is not the file its training run wrote "
                f"(sha256 differs from provenance.json; a Git LFS pointer or a partial copy?)"
            )
