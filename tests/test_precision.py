"""Float32 master weights under mixed precision without DeepSpeed (`train/precision.py`)."""

import io

import lightning as L
import pytest
import torch

from models.build import build
from tests.conftest import TEST_TINY
from train.freeze import apply_stage
from train.module import VtcModule
from train.precision import MasterWeightsAdamW
from train.recipe import Freeze, Stage


def bf16_weights(seed: int = 0, shape=(64, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05).bfloat16()


def gradients(steps: int, shape=(64, 64)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator).bfloat16() for _ in range(steps)]


def test_steps_are_float32_adamw_rounded_where_bfloat16_adamw_loses_them():
    start = bf16_weights()
    half = torch.nn.Parameter(start.clone())
    reference = torch.nn.Parameter(start.float())  # float32 AdamW from the same weights
    plain = torch.nn.Parameter(start.clone())  # AdamW on the bfloat16 weights, as before
    optimizers = [
        MasterWeightsAdamW([half], lr=1e-4),
        torch.optim.AdamW([reference], lr=1e-4, weight_decay=0.0),
        torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0),
    ]
    for grad in gradients(20):
        half.grad, reference.grad, plain.grad = grad, grad.float(), grad
        for optimizer in optimizers:
            optimizer.step()
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.detach(), reference.detach().bfloat16())
    moved = (half.detach() != start).float().mean().item()
    moved_plain = (plain.detach() != start).float().mean().item()
    assert moved > 0.8 and moved_plain < 0.5, (moved, moved_plain)


def test_state_round_trips_through_a_checkpoint_and_goes_on_exactly():
    grads = gradients(12)

    def trained(stop_at: int | None):
        param = torch.nn.Parameter(bf16_weights())
        optimizer = MasterWeightsAdamW([param], lr=3e-4, weight_decay=0.01)
        for step, grad in enumerate(grads):
            if step == stop_at:  # a fresh optimizer from the saved state, as a resumed run builds it
                buffer = io.BytesIO()
                torch.save((param.detach().clone(), optimizer.state_dict()), buffer)
                buffer.seek(0)
                weights, state = torch.load(buffer, weights_only=True)
                param = torch.nn.Parameter(weights)
                optimizer = MasterWeightsAdamW([param], lr=1.0)  # the state sets the rest
                optimizer.load_state_dict(state)
            param.grad = grad
            optimizer.step()
        return param.detach()

    assert torch.equal(trained(stop_at=None), trained(stop_at=5))
    # the master copy is what goes on: restarting from the rounded weights alone would differ
    param = torch.nn.Parameter(bf16_weights())
    optimizer = MasterWeightsAdamW([param], lr=3e-4)
    for grad in grads[:5]:
        param.grad = grad
        optimizer.step()
    assert not torch.equal(optimizer.masters[0][0], param.detach().float())


def test_a_weight_without_a_gradient_is_left_and_a_float32_one_is_its_own_copy():
    idle = torch.nn.Parameter(bf16_weights(2))
    full = torch.nn.Parameter(bf16_weights(3).float())
    reference = torch.nn.Parameter(full.detach().clone())
    optimizer = MasterWeightsAdamW([idle, full], lr=1e-3)
    plain = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.0)
    for step, grad in enumerate(gradients(4)):
        idle.grad = grad if step == 0 else None  # a DyVTE router drawn once
        full.grad, reference.grad = grad.float(), grad.float()
        optimizer.step()
        plain.step()
        if step == 0:
            after_first = idle.detach().clone()
    assert torch.equal(idle.detach(), after_first)  # no momentum step without a gradient
    assert optimizer.masters[0][1] is full and torch.equal(full.detach(), reference.detach())


@pytest.mark.parametrize(
    "dtype,precision,master",
    [
        (torch.bfloat16, "bf16-mixed", True),
        (torch.bfloat16, "bf16-true", False),  # 16-bit weights throughout, as asked
        (torch.float32, "bf16-mixed", False),  # the weights are float32 already
    ],
)
def test_a_stage_steps_master_weights_where_its_trained_weights_are_16_bit(dtype, precision, master):
    built = build("tiny", tiny=TEST_TINY, dtype=dtype)
    stage = Stage(name="s", train=Freeze(vision="frozen", projector="full", llm="frozen"))
    apply_stage(built.model, stage)
    module = VtcModule(built.model, stage, total_steps=10)
    module.trainer = L.Trainer(
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MasterWeightsAdamW) is master
