"""`vtc` whose checkpoint saves fail as a full disk fails them, on the ranks that write (tests):
VTC_TEST_FAIL=write:N fails the Nth weights write (DDP writes from rank 0 only), complete:N the
Nth info.json write (rank 0 only). Lightning's DDP launcher re-runs this file in each process."""

import errno
import json
import os
import sys
from pathlib import Path

from train import checkpoint
from train.cli import main

PHASE, _, NTH = os.environ["VTC_TEST_FAIL"].partition(":")
calls = []


def full_disk(path: Path) -> None:
    calls.append(path)
    if len(calls) == int(NTH):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


if PHASE == "write":
    writing = checkpoint.TrainablesCheckpointIO._write

    def write(self, ckpt, folder):
        folder.mkdir(parents=True, exist_ok=True)
        full_disk(folder)
        writing(self, ckpt, folder)

    checkpoint.TrainablesCheckpointIO._write = write
else:
    dumps = json.dumps

    def info_dumps(data, **kwargs):  # info.json is the one dict with a "stage_done" key
        if isinstance(data, dict) and "stage_done" in data:
            full_disk(Path("info.json"))
        return dumps(data, **kwargs)

    checkpoint.json.dumps = info_dumps

if __name__ == "__main__":
    sys.exit(main())
