"""Run outputs written atomically: a file or folder appears complete or not at all.

Everything goes to a temporary name in the same folder first and is then renamed into place
(`os.replace` is atomic on one filesystem), so a crash or kill mid-write leaves the previous
version intact instead of a truncated file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from data.errors import UserError


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path → path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise_if_out_of_room(path, err)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_dir_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder with `write(tmp_dir)`, then swap it in for `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        replace_dir(tmp, path, aside=path.with_name(f".{path.name}.old"))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_out_of_room(path, err)
        raise
    return path


def out_of_room(folder: Path, err: BaseException) -> bool:
    """Whether `err` came from a full disk or quota: an OSError that says so in its chain or,
    for writers that only find a write came up short (torch.save: "unexpected pos"), less
    than 1 MiB left where it wrote."""
    if not isinstance(err, Exception):  # Ctrl-C, SystemExit
        return False
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def raise_if_out_of_room(path: Path, err: BaseException) -> None:
    """A full disk is said in one line (the partial write is gone already); anything else is not
    handled here."""
    if out_of_room(path.parent, err):
        raise UserError(
            f"no space left in {path.parent} to write {path.name} (nothing of it was kept): free "
            "some, then run the command again (`vtc resume RUN` goes on with a run)"
        ) from err


def replace_dir(tmp: Path, final: Path, aside: Path) -> None:
    """Put the complete folder `tmp` at `final` with renames only: an older `final` is moved to
    `aside` first and removed after, so there is never a partial folder at `final`."""
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def run_metadata(recipe_source: str, stages: list[dict]) -> dict:
    """meta.json: what produced this run (library versions, git commit) and what it did."""
    import lightning
    import peft
    import torch
    import transformers

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "recipe": recipe_source,
        "stages": stages,
        "git_commit": commit,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "peft": peft.__version__,
        },
    }


def write_json_atomic(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1))
