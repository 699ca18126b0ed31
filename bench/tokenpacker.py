"""TokenPacker on the tiny base vs. the MLP projector and 2-D pooling trained the same way.

    python bench/tokenpacker.py              # accuracy table (trains the three recipes) + step time
    python bench/tokenpacker.py --step-time  # only the training-step time ratio (seconds)

Prints measured figures only; the README quotes them with this command.
"""

import argparse
import json
import statistics
import time

import torch

from data.dataset import ConversationDataset, collate
from data.shards import ShardIndex
from models.build import ComponentSpec, build
from train.datamodule import synthetic_shards
from train.recipe import load_recipe
from train.run import run_recipe

RECIPES = ("tiny/mlp", "tiny/tokenpacker", "tiny/avgpool")


def step_times(batch_size: int = 32, repeats: int = 10) -> dict:
    """Median forward+backward seconds of one instruction-tuning step, per projector, on the tiny
    architecture (step time does not depend on the weights, so no trained base is needed)."""
    torch.set_num_threads(2)
    recipe = load_recipe("tiny/tokenpacker")
    out = {}
    for name, projector, compressors in (
        ("mlp2x_gelu (64 tokens)", ComponentSpec("mlp2x_gelu"), []),
        ("tokenpacker s=2 (16 tokens)", ComponentSpec("tokenpacker", {"scale": 2}), []),
        (
            "avgpool2d s=2 (16 tokens)",
            ComponentSpec("mlp2x_gelu"),
            [ComponentSpec("avgpool2d", {"stride": 2})],
        ),
    ):
        built = build("tiny", projector, compressors, tiny=recipe.model.tiny)
        model, tok = built.model, built.tokenizer
        for p in model.vision.parameters():
            p.requires_grad_(False)
        ds = ConversationDataset(
            ShardIndex(synthetic_shards(recipe.data, "train")),
            tok,
            "vicuna_v1",
            64,
            model.image_token_id,
            512,
            model.visual_tokens(),
        )
        batch = collate([ds[i] for i in range(batch_size)], tok.pad_token_id)
        times = []
        for i in range(repeats + 2):
            started = time.perf_counter()
            loss = model(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
            ).loss
            loss.backward()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - started)
        out[name] = round(statistics.median(times), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-time", action="store_true")
    args = parser.parse_args()
    results = {}
    # step times first: after a training run its data-loader worker can linger and share the CPU
    times = step_times()
    mlp_time = times["mlp2x_gelu (64 tokens)"]
    results["step_seconds"] = times
    results["step_time_ratio_vs_mlp"] = {k: round(v / mlp_time, 3) for k, v in times.items()}
    if not args.step_time:
        for name in RECIPES:
            metrics = run_recipe(load_recipe(name), restart=True)  # a fresh measurement each time
            results[name] = {
                k: metrics[k] for k in ("accuracy", "per_family", "visual_tokens", "train_seconds")
            }
        mlp = results["tiny/mlp"]["accuracy"]
        for name in RECIPES:
            results[name]["accuracy_kept_vs_mlp"] = round(results[name]["accuracy"] / mlp, 3) if mlp else None
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
