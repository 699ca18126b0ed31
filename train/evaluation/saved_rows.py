"""Rows an interrupted `vtc evaluate` already measured, kept so that running the same command
again measures only the rest: on a 7B with several baselines and budgets a row is many minutes.

Each measured row is written, with its answers, to REPORT_DIR/.vtc-eval-rows/ as soon as it is
measured, and the row under way appends its answers there batch by batch (`PartialRow`), so a
row stopped half-way goes on from the questions it had not answered. A later evaluation into
the same folder takes a saved row (or a row's answers) only when everything that decides it is
unchanged: the model files it loads (their content; a large one's size and modification time),
the questions (their text, references and the files they come from), the template and the
settings. Anything else is measured again. The folder is removed once the report is written, and a
second evaluation into the folder meanwhile is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from data.locks import held_alone
from models.build import is_model_file
from train.accuracy import QuestionSet
from train.outputs import write_json_atomic, write_text_atomic

FOLDER = ".vtc-eval-rows"

# a run's folders that a finished run's model is not loaded from (its checkpoints are sources of
# their own), walked past
NOT_THE_MODEL = {"ckpt", "logs", "eval", "wandb"}
# files up to this size are known by their content, so that one written again unchanged (`vtc
# resume` of a finished run writes its recipe and weights again) is the same; larger ones (a
# 7B's shards, read again only to be told apart) by size and modification time
CONTENT_LIMIT = 256 * 2**20


def model_files(roots: list[str | Path]) -> list[Path]:
    """Every file a model is loaded from under each of `roots` (a folder, walked, or a file),
    sorted; a root that does not exist adds nothing."""
    found = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root.resolve())
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [d for d in subfolders if d not in NOT_THE_MODEL and not d.startswith(".")]
            found |= {(Path(folder) / n).resolve() for n in names if is_model_file(Path(n))}
    return sorted(found)


def file_stamps(paths: list[Path]) -> list[list]:
    """[path, content digest] of each file, [path, size, modification time in ns] for one over
    CONTENT_LIMIT, or [path, None] for one that is not there (a question's missing image)."""
    stamps = []
    for path in map(Path, paths):
        try:
            stat = path.stat()
        except FileNotFoundError:
            stamps.append([str(path), None])
            continue
        if stat.st_size > CONTENT_LIMIT:
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
        else:
            with path.open("rb") as handle:
                stamps.append([str(path), hashlib.file_digest(handle, "sha256").hexdigest()])
    return stamps


def questions_digest(questions: QuestionSet) -> str:
    """A digest of every question (id, image key, family, text, references) and of the files
    they come from (`file_stamps`: shards, a question file and its images)."""
    digest = hashlib.sha256()
    for q in questions.questions:
        digest.update(json.dumps([q.id, q.image, q.family, q.text, list(q.answers)]).encode())
    digest.update(json.dumps(file_stamps(questions.files)).encode())
    return digest.hexdigest()


class SavedRows:
    """The rows measured so far for one evaluation, identified by `identity` (a JSON-able dict of
    everything that decides a row besides its method) and looked up by a method key, e.g.
    (label, budget, occurrence)."""

    def __init__(self, out_dir: Path, identity: dict, fresh: bool = False):
        self.folder = Path(out_dir) / FOLDER
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        self.fresh = fresh
        self.count = 0  # rows saved in the folder for this identity, kept or measured now
        self.underway: PartialRow | None = None  # the row being measured
        self._lock = ExitStack()

    def __enter__(self) -> SavedRows:
        """One evaluation writes a report folder at a time (`held_alone`): a second would take
        rows the first is still measuring and then lose them when the first ends."""
        lock = self.folder.with_name(f"{FOLDER}.lock")
        busy = (
            f"another vtc evaluate is writing a report in {lock.parent} now (it holds {lock}); wait "
            "for it to end or give --out another folder"
        )
        self._lock.enter_context(held_alone(lock, busy, remove=True))
        if self.fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        return self

    def __exit__(self, kind, err, trace) -> None:
        """Say, when the evaluation stops short (Ctrl-C, out of memory, a bad row), that the rows
        measured so far are kept; else the report is written and nothing is left to resume."""
        with self._lock:
            if kind is None:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                underway = self.underway.count if self.underway else 0
                rows = f"the {self.count} row{'s' if self.count > 1 else ''} measured so far"
                kept = [rows] if self.count else []
                kept += [f"{underway} answers of the row under way"] if underway else []
                if kept:
                    print(
                        f"[vtc] evaluate stopped; kept in {self.folder}: {' and '.join(kept)}; the same "
                        "command measures only the rest"
                    )

    def _path(self, key: tuple) -> Path:
        return self.folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"

    def get(self, key: tuple) -> tuple[dict, dict[str, dict]] | None:
        """(the row, its answers) as measured before with the same identity, else None."""
        try:
            saved = json.loads(self._path(key).read_text())
        except (OSError, ValueError):  # none, or unreadable: measured again
            return None
        if saved.get("identity") != self.identity or saved.get("method") != list(key):
            return None
        return saved["row"], saved["answers"]

    def earlier(self, keys: list[tuple]) -> list[tuple[dict, dict[str, dict]] | None]:
        """`get` for each key, saying how many rows are kept."""
        found = [self.get(key) for key in keys]
        self.count = sum(map(bool, found))
        if self.count:
            print(
                f"[vtc] {self.count} of {len(keys)} rows were measured by an interrupted evaluation of the "
                f"same model, questions and settings; kept ({self.folder}; `vtc evaluate --fresh` measures every "
                "row again)"
            )
        return found

    def put(self, key: tuple, row: dict, answers: dict[str, dict]) -> None:
        write_json_atomic(
            self._path(key), {"identity": self.identity, "method": list(key), "row": row, "answers": answers}
        )
        self.count += 1
        self.partial(key).path.unlink(missing_ok=True)
        self.underway = None

    def partial(self, key: tuple) -> PartialRow:
        """The answers of the row `key` as it is measured (see `PartialRow`)."""
        if self.underway is None or self.underway.key != list(key):
            self.underway = PartialRow(self._path(key).with_suffix(".partial.jsonl"), self.identity, key)
        return self.underway


class PartialRow:
    """The answers of one row measured so far: a header line naming the evaluation's identity
    and the row, then a line per batch, appended as each is answered: its answers, and the
    counts of the model's components after it (`Compressor.statistics_state`)."""

    def __init__(self, path: Path, identity: str, key: tuple):
        self.path, self.key = path, list(key)
        self.header = json.dumps({"identity": identity, "method": self.key, "lines": "batches"})
        self.count = 0  # answers in the file

    def answered(self) -> tuple[dict[str, dict], list[dict]]:
        """({question id: answer}, the components' counts after the last of them) a stopped
        measurement of this row recorded; none where the file is another evaluation's. The
        line being written when it stopped is left out."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return {}, []
        if not lines or lines[0] != self.header:
            return {}, []
        found, counts = {}, []
        for line in lines[1:]:
            try:
                batch = json.loads(line)
            except ValueError:  # cut short by the stop
                break
            found.update(batch["answers"])
            counts = batch["statistics"]
        return found, counts

    def start(self, kept: dict[str, dict], counts: list[dict]) -> None:
        """Begin the file anew with the answers `kept` and `counts` (what `answered` returned)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [self.header + "\n", *([self._line(kept, counts)] if kept else [])]
        write_text_atomic(self.path, "".join(lines))
        self.count = len(kept)

    def record(self, answers: dict[str, dict], counts: list[dict]) -> None:
        """Append a batch's `answers` and the components' `counts` after it."""
        with self.path.open("a") as handle:
            handle.write(self._line(answers, counts))
        self.count += len(answers)

    @staticmethod
    def _line(answers: dict[str, dict], counts: list[dict]) -> str:
        return json.dumps({"answers": answers, "statistics": counts}) + "\n"
