"""TokenPacker on the tiny base vs. the base's MLP projector (64 tokens) and 2-D pooling (16
tokens) fine-tuned the same way (`tiny/tokenpacker`, `tiny/mlp`, `tiny/avgpool`: one instruction
stage from the shipped base; TokenPacker warm-started from the base's projector).

    python bench/tokenpacker.py [--seeds 0,1,2]  # accuracy over seeds (trains the three recipes) + step time
    python bench/tokenpacker.py --step-time      # only the training-step time ratio (seconds)
    python bench/tokenpacker.py --repeats 1      # ... one timed step per projector (quick check)

Each recipe trains on the shipped tiny base with `seed=S` (the new projector's initial weights and
the batch order), into a temporary folder; the table gives the mean and the range over seeds.

Prints measured figures only; the README quotes them with this command.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
from recipe_overrides import add_set_option  # a sibling bench module

from data.dataset import ConversationDataset, collate
from data.shards import ShardIndex
from models.build import ComponentSpec, build
from train.datamodule import synthetic_shards
from train.recipe import load_recipe
from train.run import run_recipe

RECIPES = ("tiny/mlp", "tiny/tokenpacker", "tiny/avgpool")


def step_times(overrides: Sequence[str] = (), batch_size: int = 32, repeats: int = 10) -> dict:
    """Median forward+backward seconds of one instruction-tuning step, per projector, on the tiny
    architecture (step time does not depend on the weights, so no trained base is needed); the
    batch comes from `tiny/tokenpacker`'s training data, with `overrides`."""
    recipe = load_recipe("tiny/tokenpacker", list(overrides))
    # the recipe's threads (`--set trainer.threads=1` beside another job), as the other benches
    torch.set_num_threads(recipe.trainer.threads or 2)
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
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed steps per projector, after 2 warm-up (median printed)"
    )
    add_set_option(parser, "eval.limit=100")
    args = parser.parse_args()
    results = {}
    # step times first: after a training run its data-loader worker can linger and share the CPU
    times = step_times(args.set, repeats=args.repeats)
    mlp_time = times["mlp2x_gelu (64 tokens)"]
    results["step_seconds"] = times
    results["step_time_ratio_vs_mlp"] = {k: round(v / mlp_time, 3) for k, v in times.items()}
    if not args.step_time:
        seeds = [int(x) for x in args.seeds.split(",")]
        runs = {name: [] for name in RECIPES}
        with tempfile.TemporaryDirectory() as tmp:
            for seed in seeds:
                for name in RECIPES:
                    overrides = [
                        f"seed={seed}",
                        f"output={tmp}/{name.replace('/', '-')}-s{seed}",
                        "eval.baselines=[]",
                        *args.set,
                    ]
                    metrics = run_recipe(load_recipe(name, overrides))
                    runs[name].append(metrics)
        for name in RECIPES:
            kept = [
                m["accuracy"] / mlp["accuracy"] for m, mlp in zip(runs[name], runs["tiny/mlp"], strict=True)
            ]
            results[name] = {
                "seeds": seeds,
                "accuracy": [round(m["accuracy"], 4) for m in runs[name]],
                "accuracy_kept_vs_mlp": [round(k, 4) for k in kept],
                "per_family_mean": {
                    f: round(statistics.mean(m["per_family"][f] for m in runs[name]), 4)
                    for f in runs[name][0]["per_family"]
                },
                "visual_tokens": runs[name][0]["visual_tokens"],
                "train_seconds": [m["train_seconds"] for m in runs[name]],
            }
        print(
            "| recipe | tokens | accuracy, mean (min–max) | kept vs. MLP, mean (min–max) | "
            + " | ".join(results[RECIPES[0]]["per_family_mean"])
            + " |"
        )
        for name in RECIPES:
            r = results[name]
            acc, kept = r["accuracy"], r["accuracy_kept_vs_mlp"]
            print(
                f"| {name} | {r['visual_tokens']:.0f} | {100 * statistics.mean(acc):.1f} % ({100 * min(acc):.1f}–{100 * max(acc):.1f}) "
                f"| {100 * statistics.mean(kept):.1f} % ({100 * min(kept):.1f}–{100 * max(kept):.1f}) | "
                + " | ".join(f"{100 * v:.1f} %" for v in r["per_family_mean"].values())
                + " |"
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
