"""Measures the two targets of `vtc evaluate` on the tiny LLaVA (default size, CPU):

1. a pre-LLM method at 4x fewer visual tokens: measured prefill speed-up vs. its analytic
   FLOPs ceiling (target: >= 80 % of the ceiling), at batch 1 and batch N;
2. harness overhead: the evaluator's accuracy pass (`answer_questions`: image decoding, prompt
   building, padding, generation, answer decoding) vs. (a) a plain loop that prepares the same
   inputs itself and calls `model.generate`, and (b) `model.generate` alone on the prompts
   already batched as tensors, the strictest reading (target: < 5 %).

Timing does not depend on trained weights, so the model is the tiny LLaVA built from its configs.

    python bench/evaluate.py [--images 100] [--repeats 7] [--latency-batch 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from data.dataset import collate, load_views
from data.shards import ShardIndex
from data.synth import write_synthetic
from data.templates import get_template
from models.build import ComponentSpec, build
from train.accuracy import _prompt_item, answer_questions, synthetic_questions
from train.evaluation.measure import Settings, cost


def speedups(questions, settings: Settings) -> dict:
    out = {}
    base = cost(build("tiny"), questions, 64, settings)
    for name, spec in {
        "avgpool2d stride 2 (64 → 16)": ComponentSpec("avgpool2d", {"stride": 2}),
        "random 16": ComponentSpec("random", {"tokens": 16}),
    }.items():
        row = cost(build("tiny", compressors=[spec]), questions, 64, settings)
        ceiling = base["flops"]["total"] / row["flops"]["total"]
        out[name] = {"ceiling": round(ceiling, 3)}
        for batch in ("batch1", "batchN"):
            measured = base[f"prefill_ms_{batch}"] / row[f"prefill_ms_{batch}"]
            out[name][batch] = {
                "baseline_ms": round(base[f"prefill_ms_{batch}"], 2),
                "method_ms": round(row[f"prefill_ms_{batch}"], 2),
                "speedup": round(measured, 3),
                "share_of_ceiling": round(measured / ceiling, 3),
            }
    return out


def harness_overhead(questions, repeats: int, batch_size: int) -> dict:
    built = build("tiny")
    model, tok = built.model.eval(), built.tokenizer
    template = get_template("vicuna_v1")
    items = [
        _prompt_item(
            q,
            template.prompt("<image>\n" + q.text, tok, model.image_token_id),
            load_views(questions.read_image(q.image), 64, None),
        )
        for q in questions.questions
    ]
    batches = [collate(items[i : i + batch_size], tok.pad_token_id) for i in range(0, len(items), batch_size)]

    def plain_loop():  # what a user writes without the harness: prepare each batch, generate
        with torch.no_grad():
            for i in range(0, len(questions.questions), batch_size):
                chunk = [
                    _prompt_item(
                        q,
                        template.prompt("<image>\n" + q.text, tok, model.image_token_id),
                        load_views(questions.read_image(q.image), 64, None),
                    )
                    for q in questions.questions[i : i + batch_size]
                ]
                b = collate(chunk, tok.pad_token_id)
                model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], 4, tok.eos_token_id)

    def direct():
        with torch.no_grad():
            for b in batches:
                model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], 4, tok.eos_token_id)

    def harness():
        answer_questions(model, tok, questions, 64, batch_size=batch_size, progress=False)

    runs = {"generate_only": direct, "plain_loop": plain_loop, "harness": harness}
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    best = {name: min(t) for name, t in times.items()}
    return {
        "questions": len(questions.questions),
        **{f"{name}_s": round(t, 3) for name, t in best.items()},
        "overhead_vs_plain_loop": round(best["harness"] / best["plain_loop"] - 1, 4),
        "overhead_vs_generate_only": round(best["harness"] / best["generate_only"] - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latency-batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), "test", args.images, progress=False)
        questions = synthetic_questions(ShardIndex(Path(tmp)), args.images)
        settings = Settings(latency_batch=args.latency_batch, repeats=args.repeats)
        result = {
            "threads": torch.get_num_threads(),
            "prefill_speedup_at_4x_fewer_tokens": speedups(questions, settings),
            "harness_overhead": harness_overhead(questions, max(3, args.repeats // 2), 64),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
