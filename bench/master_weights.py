"""What an optimizer step on bfloat16 weights loses, at a 7B recipe's shape and learning rate.

Under DDP or on one device, `trainer.precision: bf16-mixed` with `model.dtype: bfloat16` used
to train the weights in bfloat16: AdamW's update is applied to the 16-bit weight, and one
smaller than half the weight's spacing (2^-8 of its magnitude) rounds away. DeepSpeed keeps
float32 master weights; vtc now does too for the other strategies (`train/precision.py`). This
trains one DyVTE router of LLaVA-1.5-7B (Linear 8192 → 2048, Xavier-uniform, as
`llava-1.5-7b/dyvte/routers` builds it) with the recipe's schedule (peak 6e-5, 3 % warm-up,
cosine), both ways on the same gradients (a fixed direction plus three times as much noise),
and prints how many weights never moved and how far the bfloat16 update is from the float32 one.
Synthetic gradients, real shapes and learning rates: it measures the rounding, not a model.

    python bench/master_weights.py [--steps 300] [--lr 6e-5] [--rows 2048] [--cols 8192]
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.03) -> float:
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * step / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_both(steps: int, peak: float, rows: int, cols: int, seed: int = 0) -> dict:
    """The same AdamW steps on float32 and on bfloat16 copies of one Xavier-uniform weight."""
    torch.manual_seed(seed)
    start = torch.empty(rows, cols)
    torch.nn.init.xavier_uniform_(start)
    full = torch.nn.Parameter(start.clone())
    half = torch.nn.Parameter(start.bfloat16())
    optimizers = [torch.optim.AdamW([p], lr=peak, weight_decay=0.0) for p in (full, half)]
    direction = torch.randn(rows, cols)
    for step in range(steps):
        gradient = direction + 3 * torch.randn(rows, cols)
        full.grad, half.grad = gradient.clone(), gradient.bfloat16()
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = lr_at(step, steps, peak)
            optimizer.step()
    moved_full = full.detach() - start
    moved_half = half.detach().float() - start.bfloat16().float()
    return {
        "float32_never_moved": float((moved_full == 0).float().mean()),
        "bfloat16_never_moved": float((moved_half == 0).float().mean()),
        "float32_mean_move": float(moved_full.abs().mean()),
        "bfloat16_mean_move": float(moved_half.abs().mean()),
        "bfloat16_update_error": float((moved_half - moved_full).norm() / moved_full.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=6e-5, help="peak learning rate (DyVTE's recipe: 6e-5)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    args = parser.parse_args()
    result = train_both(args.steps, args.lr, args.rows, args.cols)
    print(
        f"{args.steps} AdamW steps, peak lr {args.lr:g}, a {args.rows}×{args.cols} weight:\n"
        f"  float32 weights:  {100 * result['float32_never_moved']:.1f} % never moved, "
        f"mean move {result['float32_mean_move']:.3g}\n"
        f"  bfloat16 weights: {100 * result['bfloat16_never_moved']:.1f} % never moved, "
        f"mean move {result['bfloat16_mean_move']:.3g}; "
        f"{result['bfloat16_update_error']:.2f} of the float32 update off"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
