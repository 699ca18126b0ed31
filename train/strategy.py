"""Lightning strategy from the recipe: single device, DDP (gloo on CPU, NCCL on GPU) or DeepSpeed
ZeRO-1/2/3 with the settings LLaVA's own `zero2.json` / `zero3.json` use."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy

from train.recipe import TrainerRecipe


def deepspeed_config(zero_stage: int) -> dict:
    """The ZeRO section LLaVA-1.5 trains with; batch sizes and precision are filled by Lightning."""
    zero = {
        "stage": zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e6,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    # No "gradient_clipping" key: Lightning fills it from the Trainer's gradient_clip_val (the
    # stage's optim.grad_clip) only when the key is absent; HF's "auto" is not Lightning's, and
    # DeepSpeed met it at the first step ('>' between 'str' and 'float').
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True}


def build_strategy(trainer: TrainerRecipe, sparse_gradients: bool = False):
    """`sparse_gradients`: some trainable parameters get no gradient in some steps (DDP must then
    search for them every step, which costs a graph traversal; off otherwise)."""
    if trainer.strategy == "auto":
        return "auto"
    if trainer.strategy == "ddp":
        on_gpu = trainer.accelerator == "gpu" or (trainer.accelerator == "auto" and torch.cuda.is_available())
        return DDPStrategy(
            process_group_backend="nccl" if on_gpu else "gloo", find_unused_parameters=sparse_gradients
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy  # GPU only: checked at validation

    # Checkpoints hold the trainables only (frozen weights come from the base); vtc's LightningModule
    # loads them non-strictly, which Lightning passes on to DeepSpeed's load_checkpoint.
    return DeepSpeedStrategy(
        config=deepspeed_config(int(trainer.strategy[-1])), exclude_frozen_parameters=True
    )
