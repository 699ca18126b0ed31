"""Convert LLaVA-format JSON or JSON lines (+ an image folder) into vtc's webdataset shards.

Bad entries never stop the conversion: whatever an entry holds — wrong types, a malformed
conversation, an `<image>` placeholder that does not match the image, empty answers, a missing,
undecodable or oversized image, an image path outside the image folder — it is skipped, counted
and listed with its id, the file and the reason in `<out>/skipped.jsonl`, and the conversion
finishes with its counts.

Nothing is half-written: shards go to a temporary folder beside `out` and move into place at
the end. A folder that already holds shards is refused unless the user asks to `overwrite` it
(replaced whole) or `append` to it (new shards numbered after the old ones).
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data.errors import UserError
from data.shards import ShardIndex, ShardWriter, existing_shards, next_shard_number, staged
from data.templates import ConversationError, conversation_turns, placeholder_problem


class BadEntry(ValueError):
    """Why one entry is skipped. `kind` groups entries that fail the same way (the summary
    counts kinds); the message says what exactly is wrong with this entry."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class ConvertReport:
    source: str = ""
    written: int = 0
    skipped: list[dict] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.written + len(self.skipped)

    def kinds(self) -> list[tuple[str, int]]:
        """The reasons entries were skipped, most common first."""
        return Counter(row["kind"] for row in self.skipped).most_common()

    def summary(self) -> str:
        lines = [
            f"written {self.written}, skipped {len(self.skipped)} of {self.total} entries in {self.source}"
        ]
        lines += [f"  {count} × {kind}" for kind, count in self.kinds()[:5]]
        return "\n".join(lines)


def check_record(record) -> None:
    """Raise BadEntry if `record` is not a usable LLaVA sample: an object with a string or
    integer `id`, a list of human/gpt messages with string values, no answer empty, and exactly
    one `<image>` (in a question) when it has an `image` — a string path — and none otherwise."""
    if not isinstance(record, dict):
        raise BadEntry("not an object", f"entry is a {type(record).__name__}, not an object")
    sample_id = record.get("id")
    if sample_id is None or isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise BadEntry("bad id", f"'id' must be a string or an integer, got {sample_id!r}")
    if "conversations" not in record:
        raise BadEntry("malformed conversation", "missing 'conversations'")
    try:
        pairs = conversation_turns(record["conversations"])
    except ConversationError as err:
        raise BadEntry("malformed conversation", str(err)) from None
    if "image" in record and (not isinstance(record["image"], str) or not record["image"].strip()):
        raise BadEntry("bad image field", f"'image' must be a file path, got {record['image']!r}")
    problem = placeholder_problem(pairs, "image" in record)
    if problem:
        raise BadEntry(*problem)
    empty = [turn for turn, (_, answer) in enumerate(pairs) if not answer.strip()]
    if empty:
        raise BadEntry("empty answer", f"turn {empty[0]}: the answer is empty")


def image_path(image_dir: Path, name: str, allow_outside: bool) -> Path:
    """`image_dir / name`, refused when it leads outside `image_dir` (`../x.png`, an absolute
    path, a link out) unless `allow_outside`."""
    path = image_dir / name
    if not allow_outside and not path.resolve().is_relative_to(image_dir.resolve()):
        raise BadEntry(
            "image outside --images",
            f"image {name!r} is outside {image_dir} (allow with --allow-outside-images)",
        )
    return path


def read_image(path: Path) -> tuple[bytes, str]:
    """Bytes and extension of a decodable image; BadEntry (naming the file) otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadEntry("image not found", f"{path}: no such file") from None
    except OSError as err:
        raise BadEntry("image unreadable", f"{path}: {err.strerror or err}") from None
    try:
        with warnings.catch_warnings():  # PIL warns, then errors, on decompression bombs
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode fully: truncated files fail here, not mid-training
                fmt = (image.format or "").lower()
                ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
                if ext is None:  # re-encode exotic formats to PNG
                    buffer = io.BytesIO()
                    image.convert("RGB").save(buffer, format="PNG")
                    return buffer.getvalue(), "png"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadEntry("image too large", f"{path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadEntry("image undecodable", f"{path}: cannot decode ({type(err).__name__}: {err})") from None
    return data, ext


def read_entries(path: Path) -> list:
    """The entries of a JSON list or a JSON-lines file (one object per line). A line that is
    not JSON becomes an entry that the conversion skips and reports (its line number as id)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    if path.suffix != ".jsonl":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            if not text.lstrip().startswith("{"):  # not JSON lines either
                raise UserError(
                    f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                ) from None
        else:
            if not isinstance(entries, list):
                raise UserError(f"{path}: expected a JSON list of samples, got {type(entries).__name__}")
            return entries
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                entries.append(_Unparsed(number, err.msg))
    return entries


@dataclass(frozen=True)
class _Unparsed:
    line: int
    error: str


@dataclass(frozen=True)
class Selection:
    """Which records to convert: only single-turn ones, only ones with an image, and a random
    `fraction` of what remains (reproducible from `seed`, kept in the file's order)."""

    single_turn: bool = False
    with_image: bool = False
    fraction: float = 1.0
    seed: int = 0

    def apply(self, records: list) -> list:
        def wanted(record) -> bool:
            if not isinstance(record, dict):
                return True  # malformed: converted as usual, i.e. skipped with its reason
            if self.with_image and "image" not in record:
                return False
            if self.single_turn:
                try:
                    return len(conversation_turns(record.get("conversations"))) == 1
                except ConversationError:
                    return True  # malformed: skipped with its reason
            return True

        if not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        kept = [i for i, record in enumerate(records) if wanted(record)]
        if self.fraction < 1:
            chosen = random.Random(self.seed).sample(kept, round(self.fraction * len(kept)))
            kept = sorted(chosen)
        return [records[i] for i in kept]


def convert_llava_json(
    json_path,
    image_dir,
    out_dir,
    samples_per_shard: int = 2000,
    progress: bool = True,
    selection: Selection | None = None,
    mode: str = "new",
    allow_outside_images: bool = False,
) -> ConvertReport:
    """Convert; `mode`: "new" (refuse a folder that holds shards), "overwrite" (replace them)
    or "append" (add shards after them; skipped.jsonl is appended to)."""
    json_path, image_dir, out_dir = Path(json_path), Path(image_dir), Path(out_dir)
    if mode not in ("new", "overwrite", "append"):
        raise ValueError(f"unknown mode {mode!r}")
    old = existing_shards(out_dir)
    if old and mode == "new":
        raise UserError(
            f"{out_dir} already holds {len(old)} shard(s); converting into it would mix two "
            "datasets: choose another --out, or --overwrite or --append"
        )
    if not image_dir.is_dir():
        raise UserError(f"--images {image_dir}: no such folder")
    records = read_entries(json_path)
    if selection is not None:
        records = selection.apply(records)
    report = ConvertReport(source=str(json_path))
    start = len(ShardIndex(out_dir)) if old and mode == "append" else 0
    with staged(out_dir, mode) as tmp:
        first_shard = next_shard_number(old) if mode == "append" else 0
        with ShardWriter(tmp, samples_per_shard, first_shard=first_shard, first_key=start) as writer:
            for position, record in enumerate(
                tqdm(records, desc="convert", disable=not progress, unit="sample")
            ):
                try:
                    if isinstance(record, _Unparsed):
                        raise BadEntry("invalid JSON line", f"line {record.line}: {record.error}")
                    check_record(record)
                    image = (None, "png")
                    if "image" in record:
                        image = read_image(image_path(image_dir, record["image"], allow_outside_images))
                except BadEntry as err:
                    report.skipped.append(_skip_row(json_path, record, position, err))
                    continue
                writer.write(record, *image)
                report.written += 1
        _write_skipped(tmp / "skipped.jsonl", report.skipped)
    return report


def _skip_row(json_path: Path, record, position: int, err: BadEntry) -> dict:
    if isinstance(record, _Unparsed):
        sample_id = f"<line {record.line}>"
    elif isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        sample_id = record["id"]
    else:
        sample_id = f"<entry {position}>"
    return {
        "id": sample_id,
        "position": position,
        "file": str(json_path),
        "kind": err.kind,
        "reason": str(err),
    }


def _write_skipped(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
