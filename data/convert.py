"""Convert LLaVA-format JSON (+ an image folder) into vtc's webdataset shards.

Bad entries never stop the conversion: a malformed record, a missing or unreadable image is
skipped, counted, and listed with its id and reason in `<out>/skipped.jsonl`.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data.errors import UserError
from data.shards import ShardWriter
from data.templates import ConversationError, conversation_turns


@dataclass
class ConvertReport:
    written: int = 0
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return f"written {self.written}, skipped {len(self.skipped)}"


def check_record(record) -> None:
    """Raise ConversationError if `record` is not a usable LLaVA sample."""
    if not isinstance(record, dict):
        raise ConversationError(f"entry is a {type(record).__name__}, not an object")
    if "id" not in record:
        raise ConversationError("missing 'id'")
    if not isinstance(record.get("conversations"), list):
        raise ConversationError("missing or non-list 'conversations'")
    pairs = conversation_turns(record["conversations"])
    has_placeholder = any("<image>" in q for q, _ in pairs)
    if "image" in record and not has_placeholder:
        raise ConversationError("has an image but no <image> placeholder in its questions")
    if "image" not in record and has_placeholder:
        raise ConversationError("has an <image> placeholder but no 'image'")


def read_image(path: Path) -> tuple[bytes, str]:
    """Bytes and extension of a decodable image; raises on missing or corrupt files."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode fully: truncated files fail here, not mid-training
        fmt = (image.format or "").lower()
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if ext is None:  # re-encode exotic formats to PNG
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    return data, ext


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
                    return len(conversation_turns(record.get("conversations") or [])) == 1
                except ConversationError:
                    return True
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
) -> ConvertReport:
    json_path, image_dir, out_dir = Path(json_path), Path(image_dir), Path(out_dir)
    records = json.loads(json_path.read_text())
    if not isinstance(records, list):
        raise UserError(f"{json_path}: expected a JSON list of samples, got {type(records).__name__}")
    if selection is not None:
        records = selection.apply(records)
    report = ConvertReport()
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for position, record in enumerate(tqdm(records, desc="convert", disable=not progress, unit="sample")):
            sample_id = (
                record.get("id", f"<entry {position}>") if isinstance(record, dict) else f"<entry {position}>"
            )
            try:
                check_record(record)
                image = read_image(image_dir / record["image"]) if "image" in record else (None, "png")
            except (ConversationError, OSError, SyntaxError, ValueError) as err:
                report.skipped.append(
                    {"id": sample_id, "position": position, "reason": f"{type(err).__name__}: {err}"}
                )
                continue
            writer.write(record, *image)
            report.written += 1
    with open(out_dir / "skipped.jsonl", "w") as f:
        for row in report.skipped:
            f.write(json.dumps(row) + "\n")
    return report
