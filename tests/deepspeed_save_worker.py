"""One rank of the DeepSpeed save-failure test (tests/test_zero.py), launched by
torch.distributed.run on CPU:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_save_worker.py OUT

A real ZeRO-2 engine (gloo) saves twice under vtc's `DeepSpeedSaveHold`: first with every
torch.save on rank 1 failing as a full disk fails it (rank 0's writes succeed, so without the
hold rank 0 would wait at the save's last barrier for the process group's timeout), then a
save that works, whose `latest` vtc writes and DeepSpeed's loader reads. Rank 0 writes
OUT/result.json.
"""

import errno
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zero_worker import batch, digest, engine_for  # noqa: E402
from train.checkpoint import DeepSpeedSaveHold  # noqa: E402
from train.run import trainable_names  # noqa: E402
from train.zero import trainable_state  # noqa: E402


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def save(engine, hold: DeepSpeedSaveHold, folder: Path, fail: bool) -> None:
    writes = torch.save
    if fail:
        torch.save = full_disk
    try:
        with hold.holding_errors():
            engine.save_checkpoint(
                str(folder), tag="checkpoint", client_state={"step": 7}, exclude_frozen_parameters=True
            )
    finally:
        torch.save = writes


def main(out: Path) -> None:
    rank = dist.get_rank()
    built, engine = engine_for(2, seed=1)
    names = trainable_names(built.model)
    loss = engine(*batch(built, rank), return_logits=True).logits.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    hold = DeepSpeedSaveHold(engine)

    save(engine, hold, out / "failed", fail=rank == 1)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, None if hold.held is None else f"{type(hold.held).__name__}: {hold.held}")

    save(engine, hold, out / "saved", fail=False)
    deepspeed_wrote_latest = (out / "saved" / "latest").exists()
    if rank == 0:
        hold.write_latest(out / "saved")
    dist.barrier()
    _, other = engine_for(2, seed=2)
    _, client = other.load_checkpoint(str(out / "saved"), load_module_strict=False)  # tag from `latest`
    state = trainable_state(engine.module, names)
    result = {
        "held": held,
        "second_save_held": hold.held is not None,
        "deepspeed_wrote_latest": deepspeed_wrote_latest,
        "latest": (out / "saved" / "latest").read_text(),
        "client_step": None if client is None else client.get("step"),
        "loaded_equal": digest(trainable_state(other.module, names)) == digest(state),
        # the engine's own methods again after the block
        "restored": not {"save", "makedirs"} & set(vars(engine.checkpoint_engine))
        and not {"save_checkpoint", "_copy_recovery_script"} & set(vars(engine)),
    }
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    main(Path(sys.argv[1]))
