"""Reading parameters that DeepSpeed ZeRO-3 may have partitioned.

Under ZeRO-3 each rank keeps a slice of every parameter and the parameter itself is an empty
`torch.Size([0])` tensor outside a gather. `gathered` makes them whole inside a block (a no-op
for ordinary or ZeRO-2 parameters, and then DeepSpeed is never imported), so the same code
serves a single device, DDP and ZeRO-2/3. Under DeepSpeed every rank must enter it together (a
gather is a collective).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


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


def as_call(module: nn.Module, fn: Callable[..., T], *args) -> T:
    """`fn(*args)` run as a call of `module`: the hooks registered on `module` run around it.

    ZeRO-3 gathers a module's own parameters (not its sub-modules') in hooks around its calls:
    before its forward, and, through the tensors the call returns, before its backward. A
    component that reads its own parameters in a method the host calls instead of `forward`
    (FALCON's registers in `extend_embeddings`, CoViPAL's null key in `before_layer`) runs that
    part through here, returning tensors (or tuples of them) so that the backward gather finds
    them. DeepSpeed otherwise gathers such a parameter for the forward only, on behalf of the
    module running then, and backward meets it partitioned (an empty tensor). Without ZeRO-3
    this is `fn(*args)` with the module's hooks, if any, around it."""
    shadowed = module.__dict__.get("forward")
    module.forward = fn  # an instance attribute: `nn.Module.__call__` runs it in place of the class's
    try:
        return module(*args)
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed
