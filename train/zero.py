"""Trainable weights in and out of a model whose parameters DeepSpeed ZeRO-3 has partitioned.

Under ZeRO-3 each rank keeps a slice of every parameter and the parameter itself is an empty
`torch.Size([0])` tensor outside a gather: reading it gives nothing, and loading a saved tensor
into it fails with the "size mismatch ... torch.Size([0])" error LLaVA-family trainers are known
for. Both functions here gather the parameters they touch first (a no-op for ordinary or ZeRO-2
parameters), so the same call serves a single device, DDP and ZeRO-2/3. Under DeepSpeed every
rank must call them (a gather is a collective).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


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


def trainable_state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the named parameters of `model` (gathered under ZeRO-3)."""
    params = {name: p for name, p in model.named_parameters() if name in names}
    with gathered(list(params.values()), modify=False):
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `model`'s parameters of those names (partitioned or not)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"weights this model lacks, e.g. {unknown[:3]}")
    targets = [params[name] for name in tensors]
    with gathered(targets, modify=True), torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(param.shape)}")
            param.copy_(tensor.to(param.device, param.dtype))
