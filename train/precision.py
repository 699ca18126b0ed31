"""Float32 master weights for 16-bit weights a stage trains without DeepSpeed.

A recipe in half precision builds its model in `model.dtype` (bfloat16 for the 7B recipes) and
trains with `trainer.precision: bf16-mixed`, which autocasts the computation and leaves the
weights as the model holds them. Under DDP or on one device, AdamW then stepped the trained
weights in bfloat16, where an update smaller than half a weight's spacing (2^-9 to 2^-8 of the
weight) rounds away: at DyVTE's learning rate (6e-5, cosine) 41 % of a 7B router's weights never moved
(`python bench/master_weights.py`). DeepSpeed keeps float32 master weights and optimizer states
of its own; `MasterWeightsAdamW` does the same for the other strategies. The model keeps its
16-bit weights for the forward and backward (nothing else changes dtype); the optimizer steps
float32 copies of them and writes each step's result back, rounded. Its state (the copies and
AdamW's moments, float32) is in every checkpoint, so a resumed run goes on exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MasterWeightsAdamW(torch.optim.Optimizer):
    """AdamW on float32 copies of `params`; each step rounds the copies back into `params`.

    Its parameter groups hold the model's own weights, so that Lightning's gradient clipping
    and LR scheduler act on it as on any optimizer. A float32 weight is its own copy (stepped
    in place); a weight without a gradient in a step is left, as torch's AdamW leaves it."""

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0
    ):
        super().__init__(list(params), {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.masters = [
            [p if p.dtype == torch.float32 else p.detach().float() for p in group["params"]]
            for group in self.param_groups
        ]
        self.inner = torch.optim.AdamW(
            [
                {"params": masters, **self._settings(group)}
                for masters, group in zip(self.masters, self.param_groups, strict=True)
            ]
        )

    @staticmethod
    def _settings(group: dict) -> dict:
        return {key: value for key, value in group.items() if key != "params"}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, inner, masters in zip(
            self.param_groups, self.inner.param_groups, self.masters, strict=True
        ):
            inner.update(self._settings(group))  # the learning rate the scheduler set
            for param, master in zip(group["params"], masters, strict=True):
                if master is not param:
                    master.grad = None if param.grad is None else param.grad.float()
        self.inner.step()
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            for param, master in zip(group["params"], masters, strict=True):
                if master is not param:
                    param.copy_(master)  # rounded to the weight's dtype
                    master.grad = None  # float32 gradients only while stepping
        return loss

    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "masters": [[m.detach().clone() for m in masters] for masters in self.masters],
            "groups": [self._settings(group) for group in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for masters, saved in zip(self.masters, state_dict["masters"], strict=True):
                for master, value in zip(masters, saved, strict=True):
                    master.copy_(value)
        for group, saved in zip(self.param_groups, state_dict["groups"], strict=True):
            group.update(saved)


def needs_master_weights(params: list[torch.Tensor], precision: str, deepspeed: bool) -> bool:
    """Whether a stage's optimizer keeps float32 master weights: some trained weight is 16-bit,
    the precision is mixed (`bf16-true` asks for 16-bit weights throughout) and DeepSpeed, which
    keeps its own, does not step them."""
    return (
        not deepspeed
        and precision.endswith("-mixed")
        and any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    )
