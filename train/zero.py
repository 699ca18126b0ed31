"""Trainable weights in and out of a model whose parameters DeepSpeed ZeRO-3 has partitioned:
loading a saved tensor into a partitioned parameter fails with the "size mismatch ...
torch.Size([0])" error LLaVA-family trainers are known for, so both functions gather first
(models.gather). Under DeepSpeed every rank must call them."""

from __future__ import annotations

import torch
from torch import nn

from models.gather import gathered, is_partitioned  # noqa: F401  (is_partitioned: for the tests)


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
