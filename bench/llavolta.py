"""LLaVolta on the tiny base: its schemes against the uncompressed fine-tune trained the same way,
and the heavy scheme's prefill FLOPs on the LLaVA-1.5-7B shapes.

    python bench/llavolta.py [--seeds 0,1,2] [--schemes none,4stage,heavy] [--keep DIR]
    python bench/llavolta.py --flops-7b      # only the 7B FLOPs (meta device, seconds)
    python bench/llavolta.py --step-time     # training-step time of each phase (a minute)
    python bench/llavolta.py --schemes none,heavy --set stages.0.steps=600   # recipes overridden

Each `tiny/llavolta-<scheme>` recipe fine-tunes the shipped tiny base (projector + LLM) with
`seed=S`; `none` is the same fine-tune without compression. For every run: the instruct stage's
wall time, and held-out accuracy, visual tokens per layer and prefill FLOPs without
compression and with heavy compression (K=2, S=8 of 32 layers) at inference (the run's own
setting is one of the two). Prints measured figures only; the README quotes them.
"""

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from recipe_overrides import add_set_option  # a sibling bench module

from data.dataset import ConversationDataset, collate
from models.build import build
from models.compressors.base import Progress
from models.compressors.llavolta import Phase, compression_ratio
from models.flops import prefill_flops
from train.accuracy import evaluate_accuracy, synthetic_questions
from train.datamodule import split_shards
from train.evaluation.measure import generate, prompt_batch, text_tokens
from train.export import rebuild_run
from train.recipe import load_recipe
from train.run import build_from_recipe, run_recipe

INFERENCE = {"none": None, "heavy": Phase(layer=2, stride=8)}  # settings every run is measured at


def measure(run_dir: Path, recipe, limit: int) -> dict:
    """Accuracy, visual tokens per layer and prefill FLOPs of a trained run per inference
    setting; the run's own setting reuses the accuracy its training run measured."""
    built = rebuild_run(run_dir)[0]
    model = built.model.eval()
    component = model.compressors[0]
    own = component.config.inference
    test = split_shards(recipe.data, "test")
    size = built.hf.config.vision_config.image_size
    one = prompt_batch(built, synthetic_questions(test, 1), size, 1)
    out = {}
    for label, phase in INFERENCE.items():
        component.config = dataclasses.replace(component.config, inference=phase)
        _, visual, visual_layers = generate(built, one, 1)
        text = text_tokens(model, one)
        per_layer = [text + n for n in visual_layers[0].tolist()]
        flops = prefill_flops(built.hf.config, text, int(visual[0]), per_layer, 0.0, images=1)
        if phase == own and limit == recipe.eval.limit:
            accuracy = json.loads((run_dir / "metrics.json").read_text())
        else:
            accuracy = evaluate_accuracy(model, built.tokenizer, test, size, limit=limit, progress=False)
        out[label] = {
            "own": phase == own,
            "accuracy": round(accuracy["accuracy"], 4),
            "per_family": {k: round(v, 4) for k, v in accuracy["per_family"].items()},
            "visual_tokens_per_layer": [n - text for n in per_layer],
            "llm_gflops": round(flops.as_dict()["llm"] / 1e9, 4),
        }
    return out


def flops_7b(text_tokens: int = 60) -> dict:
    """Prefill FLOPs of LLaVA-1.5-7B (meta device: shapes only) uncompressed and under heavy
    compression (pooling 576 → 72 tokens before layer 2 of 32), vision + LLM and LLM only."""
    built = build("models/configs/llava-1.5-7b-hf", device="meta")
    config, layers = built.hf.config, built.hf.config.text_config.num_hidden_layers
    result = {}
    for label, per_layer in (
        ("uncompressed", [text_tokens + 576] * layers),
        ("heavy K=2 S=8", [text_tokens + 576] * 2 + [text_tokens + 72] * (layers - 2)),
    ):
        flops = prefill_flops(config, text_tokens, 576, per_layer, 0.0, images=1).as_dict()
        result[label] = {
            "total_tflops": round(flops["total"] / 1e12, 2),
            "llm_tflops": round(flops["llm"] / 1e12, 2),
            "vision_tflops": round(flops["vision"] / 1e12, 2),
        }
    result["compression_ratio_heavy"] = round(compression_ratio(layers, 2, 8), 3)
    result["text_tokens"] = text_tokens
    return result


def step_times(repeats: int = 12, batch_size: int = 32) -> dict:
    """Median forward + backward + optimizer seconds of one instruction-tuning step of the tiny
    model per (K, S) of the schemes, the settings interleaved in every repeat (so that a load on
    the machine weighs on all alike), and each scheme's expected stage time relative to no
    compression (the mean over its phases, which are equal in length)."""
    recipe = load_recipe("tiny/llavolta-none")
    settings = {"none": None, "K=2 S=8": Phase(2, 8), "K=2 S=2": Phase(2, 2), "K=16 S=2": Phase(16, 2)}
    built = build_from_recipe(recipe)  # step time does not depend on the weights
    model, data = built.model.train(), split_shards(recipe.data, "train")
    dataset = ConversationDataset(
        data,
        built.tokenizer,
        "vicuna_v1",
        64,
        model.image_token_id,
        512,
        model.visual_tokens(),
        turns=recipe.data.turns,
    )
    batch = collate([dataset[i] for i in range(batch_size)], built.tokenizer.pad_token_id)
    for p in model.vision.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    component = model.compressors[0]
    times = {label: [] for label in settings}
    for repeat in range(repeats + 1):
        for label, phase in settings.items():
            component.config = dataclasses.replace(component.config, schedule=(phase or Phase(None),))
            component.set_progress(Progress(0, 1))
            started = time.perf_counter()
            loss = model(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if repeat:  # the first round warms up
                times[label].append(time.perf_counter() - started)
    median = {label: statistics.median(t) for label, t in times.items()}
    none = median["none"]
    return {
        "step_seconds": {k: round(v, 3) for k, v in median.items()},
        "expected_stage_time_vs_none": {
            "4stage": round(
                (median["K=2 S=8"] + median["K=2 S=2"] + median["K=16 S=2"] + none) / 4 / none, 3
            ),
            "heavy": round(median["K=2 S=8"] / none, 3),
        },
        "sequence_length": int(batch["input_ids"].shape[1]) - 1 + model.visual_tokens(),
    }


def summary(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} % ({100 * min(values):.1f}–{100 * max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--schemes", default="none,4stage,heavy")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--limit", type=int, default=500, help="test images per accuracy figure")
    parser.add_argument("--flops-7b", action="store_true", help="only the 7B FLOPs")
    parser.add_argument("--step-time", action="store_true", help="only the training-step times")
    add_set_option(parser, "stages.0.steps=600")
    args = parser.parse_args()
    # the recipes' threads (`--set trainer.threads=1` beside another job), else the machine's 2
    torch.set_num_threads(load_recipe("tiny/llavolta-none", args.set).trainer.threads or 2)
    results = {"flops_7b": flops_7b()}
    if args.step_time:
        results["step_time"] = step_times()
    elif not args.flops_7b:
        seeds = [int(s) for s in args.seeds.split(",")]
        schemes = args.schemes.split(",")
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llavolta-bench-"))
        runs = {scheme: [] for scheme in schemes}
        for seed in seeds:
            for scheme in schemes:
                run_dir = root / f"{scheme}-s{seed}"
                recipe = load_recipe(
                    f"tiny/llavolta-{scheme}", [f"seed={seed}", f"output={run_dir}", *args.set]
                )
                if (run_dir / "metrics.json").is_file():  # a kept run: measure it again, do not retrain
                    metrics = json.loads((run_dir / "metrics.json").read_text())
                else:
                    metrics = run_recipe(recipe)
                runs[scheme].append(
                    {"train_seconds": metrics["train_seconds"], **measure(run_dir, recipe, args.limit)}
                )
                print(json.dumps({"scheme": scheme, "seed": seed, **runs[scheme][-1]}), flush=True)
        results["tiny"] = runs
        reference = runs.get("none")
        print(
            "| scheme | inference | accuracy, mean (min–max) | kept vs. none | train time vs. none | LLM GFLOPs |"
        )
        print("|---|---|---|---|---|---|")
        for scheme in schemes:
            for label in INFERENCE:
                acc = [r[label]["accuracy"] for r in runs[scheme]]
                kept = time = "—"
                if reference:
                    kept = summary(
                        [
                            r[label]["accuracy"] / n["none"]["accuracy"]
                            for r, n in zip(runs[scheme], reference, strict=True)
                        ]
                    )
                    time = f"{statistics.mean(r['train_seconds'] / n['train_seconds'] for r, n in zip(runs[scheme], reference, strict=True)):.2f}×"
                gflops = runs[scheme][0][label]["llm_gflops"]
                own = " (own)" if runs[scheme][0][label]["own"] else ""
                print(f"| {scheme} | {label}{own} | {summary(acc)} | {kept} | {time} | {gflops:.3f} |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
