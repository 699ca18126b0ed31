"""Reading parameters that DeepSpeed ZeRO-3 may have partitioned.

Under ZeRO-3 each rank keeps a slice of every parameter and the parameter itself is an empty
`torch.Size([0])` tensor outside a gather. `gathered` makes them whole inside a block (a no-op
for ordinary or ZeRO-2 parameters, and then DeepSpeed is never imported), so the same code
serves a single device, DDP and ZeRO-2/3. Under DeepSpeed every rank must enter it together (a
gather is a collective).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # set by deepspeed.zero.Init / ZeRO-3 engines


@contextmanager
def gathered(params: list[torch.Tensor], modify: bool):
    """Full tensors inside the block. With `modify`, what rank 0 writes into them is scattered
    back to every rank's partition on exit."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
