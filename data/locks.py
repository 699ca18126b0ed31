"""One writer at a time for a folder vtc writes (a run, a shard folder): a kernel lock (flock) on
a file, never the file's existence, so a killed writer leaves no stale lock."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from data.errors import UserError


@contextmanager
def held_alone(path: Path, busy: str, remove: bool = False):
    """Hold an exclusive lock on `path` (created if missing) for the block, or refuse with
    UserError(`busy`) at once when another process holds it. Yields whether it is held: False on
    a filesystem without flock (e.g. a shared one mounted without it), where the block runs
    unlocked. `remove`: delete the file as the block ends, still holding it (a lock file in a
    folder the user reads, beside shards or a report)."""
    with path.open("a") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise UserError(busy) from None
        except OSError:
            held = False
        try:
            yield held
        finally:
            if remove:
                path.unlink(missing_ok=True)
