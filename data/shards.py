"""Webdataset tar shards of LLaVA-format samples, and an indexed reader.

A sample is stored under key `<safe id>` as `<key>.json` (the LLaVA record: id, conversations and
any extra metadata) and, when it has an image, `<key>.png`/`<key>.jpg`. Shards are written with
webdataset's `ShardWriter`, so any webdataset pipeline can stream them. vtc reads them through
`ShardIndex`, which indexes the tar headers once and then reads any sample by position: a sampler
can then resume at an exact sample, and DDP ranks get disjoint samples with Lightning's
DistributedSampler.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from data.errors import UserError
from data.locks import held_alone

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def safe_key(sample_id: str) -> str:
    """Webdataset splits a member name at its first dot: keep keys to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(sample_id))


SHARD_NAME = re.compile(r"shard-(\d+)\.tar")  # what ShardWriter names its shards


class ShardWriter:
    """Writes samples into `out_dir/shard-000000.tar`, ... (`samples_per_shard` each).
    `first_shard` and `first_key` continue the numbering of shards written before (appending)."""

    def __init__(
        self, out_dir: str | Path, samples_per_shard: int = 2000, first_shard: int = 0, first_key: int = 0
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pattern = str(self.out_dir / "shard-%06d.tar")
        self._writer = wds.ShardWriter(
            pattern, maxcount=samples_per_shard, verbose=0, start_shard=first_shard
        )
        self.first_key = first_key
        self.count = 0

    def write(self, record: dict, image_bytes: bytes | None = None, image_ext: str = "png") -> None:
        sample = {
            "__key__": f"{self.first_key + self.count:09d}_{safe_key(record['id'])}",
            "json": json.dumps(record).encode(),
        }
        if image_bytes is not None:
            sample[image_ext] = image_bytes
        self._writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class _Entry:
    shard: int
    members: dict  # ext -> (data offset, size)


class ShardIndex:
    """Random access to the samples of a folder (or list) of tar shards, in shard order."""

    def __init__(self, shards: str | Path | list):
        self.paths = list_shards(shards)
        self.entries: list[_Entry] = []
        for shard_id, path in enumerate(self.paths):
            grouped = index_shard(path)
            self.entries.extend(_Entry(shard_id, members) for members in grouped.values())
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(shard)
        if handle is None:  # opened once per shard, and kept
            handle = self._handles[shard] = open(self.paths[shard], "rb")
        # a positioned read: DataLoader workers forked from a process that had the file open
        # share its file position, so seek-then-read would read at another worker's offset
        return os.pread(handle.fileno(), size, offset)

    def record(self, index: int) -> dict:
        """The sample's JSON record, without decoding its image."""
        entry = self.entries[index]
        return json.loads(self._read(entry.shard, *entry.members["json"]))

    def image_bytes(self, index: int) -> bytes | None:
        entry = self.entries[index]
        ext = next((e for e in IMAGE_EXTS if e in entry.members), None)
        return None if ext is None else self._read(entry.shard, *entry.members[ext])

    def __getstate__(self):  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}


_REPORTED_CUTS: set[Path] = set()  # shards said to end early, said once per process


def index_shard(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{sample key: {extension: (data offset, size)}} of one uncompressed tar shard.

    A file that is not such a tar is refused by name. A shard that ends early (a copy cut short, a
    damaged block) keeps the samples before the cut, and says so once per process: tarfile stops
    without a word at a cut header, so the missing end-of-archive marker is what tells."""
    size = path.stat().st_size
    grouped: dict[str, dict] = {}
    with open(path, "rb") as file:
        if os.pread(file.fileno(), 2, 0) == b"\x1f\x8b":  # samples are read at offsets a stream has not
            raise UserError(f"{path} is a gzip-compressed tar; vtc reads shards uncompressed (gunzip it)")
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except tarfile.ReadError as err:
            raise UserError(
                f"{path} is not a readable tar shard ({err}); remove it, or write it again with "
                "`vtc data convert`"
            ) from None
        try:
            for member in tar:
                if member.isfile() and member.offset_data + member.size <= size:
                    key, _, ext = member.name.partition(".")
                    grouped.setdefault(key, {})[ext] = (member.offset_data, member.size)
            end = tar.offset  # where the end-of-archive marker (a zero block) must begin
        except tarfile.ReadError:  # the cut is inside a member's data
            end = size
        marker = os.pread(file.fileno(), tarfile.BLOCKSIZE, end)
    if marker != bytes(tarfile.BLOCKSIZE) and path not in _REPORTED_CUTS:
        _REPORTED_CUTS.add(path)
        print(
            f"[vtc] WARNING: {path} ends early (cut short or damaged, {size} bytes): its {len(grouped)} "
            "samples before the cut are used, one the cut splits is skipped and listed when read, "
            "and the rest of the shard is lost; copy it again",
            file=sys.stderr,
        )
    return grouped


def list_shards(shards: str | Path | list) -> list[Path]:
    if isinstance(shards, (list, tuple)):
        paths = [Path(p) for p in shards]
    else:
        root = Path(shards)
        paths = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"no shards at {shards}" + (f" (missing: {missing[:3]})" if missing else ""))
    return paths


def existing_shards(out_dir: Path) -> list[Path]:
    """The shards a folder already holds (none if it does not exist)."""
    return list_shards(out_dir) if out_dir.is_dir() and any(out_dir.glob("*.tar")) else []


def next_shard_number(shards: list[Path]) -> int:
    """The number after the highest `shard-NNNNNN.tar` among `shards`: appended shards never reuse
    a name, even when a shard in the middle was deleted (then fewer shards than that number)."""
    numbers = [int(match.group(1)) for path in shards if (match := SHARD_NAME.fullmatch(path.name))]
    return max(numbers, default=-1) + 1


def is_shard_output(path: Path) -> bool:
    """What vtc writes into a shard folder: the shards and the list of skipped entries."""
    return path.is_file() and (path.suffix == ".tar" or path.name == "skipped.jsonl")


@contextmanager
def staged(out_dir: Path, mode: str):
    """A temporary folder beside `out_dir` to write shards into; when the block finishes it is
    published into `out_dir` (`publish`), and whatever happens it is removed, so an interrupted
    write (Ctrl-C; SIGTERM, which `vtc` turns into an exit through exceptions) leaves nothing
    behind; one that SIGKILL left is removed by the next writer. `out_dir` must not be a file."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder for shards")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with only_writer(out_dir):
        others = (
            sorted(p.name for p in out_dir.iterdir() if not is_shard_output(p)) if out_dir.is_dir() else []
        )
        if mode == "overwrite" and others:  # it is replaced whole: those would go with it
            raise UserError(
                f"--overwrite replaces {out_dir} whole, and it holds more than shards "
                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): give the shards a folder of their own"
            )
        prefix = f".{out_dir.name}.vtc-tmp-"
        for stale in out_dir.parent.glob(f"{prefix}*"):  # of a writer killed outright (SIGKILL)
            shutil.rmtree(stale, ignore_errors=True)  # under the lock: no writer is using it
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
        try:
            yield tmp
            publish(tmp, out_dir, mode)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def only_writer(out_dir: Path):
    """One vtc command writes a shard folder at a time: a second one (the same conversion
    started twice, an `--append` beside another) is refused before it writes, since both would
    give their shards the same names (`held_alone`, on a hidden file beside the folder, which
    goes with the writer)."""
    path = out_dir.parent / f".{out_dir.name}.vtc-lock"
    busy = f"another vtc command is writing {out_dir} now (it holds {path}); wait for it to end"
    with held_alone(path, busy, remove=True):
        yield


def publish(tmp: Path, out_dir: Path, mode: str) -> None:
    """Shards finished in the temporary folder `tmp` (beside `out_dir`) become `out_dir`
    ("new", "overwrite": replaced whole) or join it ("append": shards and skipped.jsonl added)."""
    if mode == "append" and out_dir.is_dir():
        shards = sorted(tmp.glob("*.tar"))
        taken = [shard.name for shard in shards if (out_dir / shard.name).exists()]
        if taken:  # `next_shard_number` numbers new shards after the old: a bug if this happens
            raise FileExistsError(f"appending would replace {out_dir}'s {', '.join(taken[:3])}")
        for shard in shards:
            shard.rename(out_dir / shard.name)
        if (tmp / "skipped.jsonl").is_file():
            with open(out_dir / "skipped.jsonl", "a") as f:
                f.write((tmp / "skipped.jsonl").read_text())
        return
    if out_dir.exists():  # overwrite, or "new" into an existing folder without shards
        if mode == "new":
            for item in tmp.iterdir():
                item.replace(out_dir / item.name)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
        out_dir.rename(trash / out_dir.name)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    tmp.rename(out_dir)
