"""CoViPAL on the tiny base against the training-free baselines at the same visual-token counts,
and the scorer's cost against the prefill it saves.

    python bench/covipal.py [--seeds 0,1,2] [--keep DIR] [--e2e]
    python bench/covipal.py --cost          # only the scorer's cost (seconds)
    python bench/covipal.py --time-7b       # only its time at the 7B shapes (20 s, 1.5 GB)

For each seed, `tiny/covipal` (stage 1; with --e2e also `tiny/covipal-e2e`, stage 1 then the
soft-mask stage) trains the scorer on the frozen shipped base; `vtc evaluate` then measures the
trained scorer at 32, 16 and 8 of the 64 visual tokens next to the uncompressed base and the
training-free baselines at the same counts (the baselines once: they do not depend on the seed).
Cost: the scorer's FLOPs on the LLaVA-1.5-7B shapes (576 visual + 60 text tokens, 144 kept)
against the LLM FLOPs its pruning saves, and its measured time against the measured prefill
time saved, on the tiny model and (one decoder layer timed, times 32) at the 7B shapes. Prints
measured figures only; the README quotes them.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from recipe_overrides import add_set_option  # a sibling bench module
from torch.utils.flop_counter import FlopCounterMode

from models.build import ComponentSpec, build, dims_of
from models.compressors import build_component
from models.flops import prefill_flops
from models.sequence import SequenceState
from train.evaluate import Settings, evaluate
from train.evaluation.measure import timed
from train.recipe import load_recipe, resolve_base
from train.run import run_recipe

BASELINES = ["fastv", "pdrop", "divprune", "visionzip", "random", "pooling"]


def one_prompt_state(width: int, visual: int, text: int) -> SequenceState:
    """One prompt entering the LLM: BOS, `visual` image tokens, `text` instruction tokens, hidden
    states of `width` (random values; on the current default device, e.g. meta for shapes only)."""
    length = 1 + visual + text
    visual_mask = torch.zeros(1, length, dtype=torch.bool)
    visual_mask[0, 1 : 1 + visual] = True
    return SequenceState(
        torch.randn(1, length, width),
        torch.ones(1, length, dtype=torch.bool),
        torch.arange(length)[None],
        visual_mask,
    )


def llava_7b_config():
    return build(resolve_base("models/configs/llava-1.5-7b-hf"), device="meta").hf.config


def flops_7b(text: int = 60, visual: int = 576, kept: int = 144) -> dict:
    """Scorer FLOPs (counted by torch on real tensors) vs the LLM FLOPs pruning saves on 7B."""
    config = llava_7b_config()
    dims = dims_of(config)
    scorer = build_component("covipal", {"guidance_layer": 16}, dims)
    state = one_prompt_state(dims.llm_width, visual, text)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        scorer.score(state)
    layers = config.text_config.num_hidden_layers
    full = prefill_flops(config, text + 1, visual).as_dict()["llm"]
    pruned = prefill_flops(config, text + 1, visual, [text + 1 + kept] * layers).as_dict()["llm"]
    saved = full - pruned
    return {
        "scorer_gflops": round(counter.get_total_flops() / 1e9, 2),
        "llm_tflops_saved": round(saved / 1e12, 2),
        "scorer_share_of_saved": round(counter.get_total_flops() / saved, 4),
    }


@torch.no_grad()
def time_7b_shapes(text: int = 60, visual: int = 576, kept: int = 144, repeats: int = 3) -> dict:
    """Measured at the LLaVA-1.5-7B shapes on this machine (random weights: the time does not
    depend on them; batch 1, fp32): one decoder layer of the 7B LLM (HF's LlamaDecoderLayer) at
    the uncompressed and the pruned length, times the LLM's layers (L_p = 0: every layer runs
    pruned), against the scorer at the 7B width on the same prompt. The LLM is run one layer at
    a time because 7B fp32 weights do not fit this machine's memory."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    llava = llava_7b_config()
    config = llava.text_config
    layer, rotary = LlamaDecoderLayer(config, layer_idx=0).eval(), LlamaRotaryEmbedding(config)

    def one_layer(length: int) -> float:
        hidden = torch.randn(1, length, config.hidden_size)
        position = rotary(hidden, torch.arange(length)[None])
        return timed(lambda: layer(hidden, position_embeddings=position), repeats)

    full, pruned = one_layer(1 + visual + text), one_layer(1 + kept + text)
    scorer = build_component("covipal", {"guidance_layer": 16}, dims_of(llava)).eval()
    state = one_prompt_state(config.hidden_size, visual, text)
    seconds = timed(lambda: scorer.score(state), repeats)
    saved = config.num_hidden_layers * (full - pruned)
    return {
        "layer_seconds": {"uncompressed": round(full, 3), "pruned": round(pruned, 3)},
        "llm_seconds_saved": round(saved, 2),
        "scorer_seconds": round(seconds, 4),
        "scorer_share_of_saved": round(seconds / saved, 4),
    }


@torch.no_grad()
def time_tiny(run_dir: Path, repeats: int = 20) -> dict:
    """Measured prefill (batch 8, one generated token) of the frozen base and of the trained
    scorer at its recipe's reserve, and the scorer's own time, on the tiny model."""
    from train.accuracy import synthetic_questions
    from train.datamodule import split_shards
    from train.evaluation.measure import generate, prompt_batch
    from train.export import rebuild_run
    from train.recipe import resolve_base

    recipe = load_recipe(run_dir / "recipe.yaml")
    pruned, base = rebuild_run(run_dir)[0], build(resolve_base(recipe.model.base))
    size = base.hf.config.vision_config.image_size
    batch = prompt_batch(base, synthetic_questions(split_shards(recipe.data, "test"), 8), size, 8)
    model = pruned.model.eval()
    with torch.no_grad():
        state = model.prepare(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], padding_side="left"
        )
    scorer = model.compressors[0]
    seconds = {
        "base_prefill": timed(lambda: generate(base, batch, 1), repeats),
        "pruned_prefill": timed(lambda: generate(pruned, batch, 1), repeats),
        "scorer": timed(lambda: scorer.score(state), repeats),
    }
    saved = seconds["base_prefill"] - (seconds["pruned_prefill"] - seconds["scorer"])
    return {
        **{k: round(v * 1000, 2) for k, v in seconds.items()},
        "unit": "ms",
        "scorer_share_of_saved": round(seconds["scorer"] / saved, 4) if saved > 0 else None,
    }


def oracle(
    limit: int,
    pairs=((0, 1), (0, 2), (0, 3), (1, 2), (1, 3)),
    keep: int = 16,
    queries: str = "instruction",
) -> dict:
    """Accuracy of pruning to `keep` tokens by the teacher's own targets (the attention the
    instruction pays each visual token at L_g of the unpruned LLM) instead of the scorer's:
    the most a perfect stage-1 scorer could reach, per (L_p, L_g)."""
    from models.compressors.covipal import CoViPAL
    from train.accuracy import evaluate_accuracy
    from train.datamodule import split_shards
    from train.recipe import resolve_base

    recipe = load_recipe("tiny/covipal")
    original = CoViPAL.score

    def by_target(self, state):
        scores, columns, valid = original(self, state)
        return self.guidance_targets(state, columns)[0], columns, valid

    CoViPAL.score = by_target
    out = {}
    try:
        for layer, guidance in pairs:
            params = {"layer": layer, "guidance_layer": guidance, "tokens": keep, "guidance_queries": queries}
            spec = ComponentSpec("covipal", params)
            built = build(resolve_base(recipe.model.base), compressors=[spec])
            test = split_shards(recipe.data, "test")
            accuracy = evaluate_accuracy(
                built.model.eval(), built.tokenizer, test, 64, limit=limit, progress=False
            )
            out[f"L_p={layer} L_g={guidance}"] = round(accuracy["accuracy"], 4)
            print(json.dumps(out), flush=True)
    finally:
        CoViPAL.score = original
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--limit", type=int, default=500, help="test images per accuracy figure")
    parser.add_argument(
        "--e2e", action="store_true", help="also train the soft-mask stage (tiny/covipal-e2e)"
    )
    parser.add_argument(
        "--cost", action="store_true", help="only the scorer's cost (with --keep: also on tiny)"
    )
    parser.add_argument(
        "--time-7b",
        action="store_true",
        help="only: the scorer's time against the prefill time it saves at the 7B shapes (one layer timed)",
    )
    parser.add_argument("--tokens", default="32,16,8", help="visual-token counts to compare at")
    parser.add_argument(
        "--oracle", action="store_true", help="only: prune by the teacher's targets, per (L_p, L_g)"
    )
    parser.add_argument(
        "--guidance-queries",
        choices=["instruction", "last"],
        default="instruction",
        help="with --oracle: whose attention is the target (all instruction tokens, or the last prompt token)",
    )
    add_set_option(parser, "stages.0.steps=600")
    args = parser.parse_args()
    # the recipe's threads (`--set trainer.threads=1` beside another job), else the machine's 2
    torch.set_num_threads(load_recipe("tiny/covipal", args.set).trainer.threads or 2)
    if args.oracle:
        with torch.no_grad():
            print(json.dumps({"oracle_at_16": oracle(args.limit, queries=args.guidance_queries)}, indent=1))
        return
    if args.time_7b:
        print(json.dumps({"time_7b_shapes": time_7b_shapes()}, indent=1))
        return
    results = {"cost_7b": flops_7b()}
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="covipal-bench-"))
    first = root / f"covipal-s{args.seeds.split(',')[0]}"
    if args.cost and (first / "metrics.json").is_file():
        results["cost_tiny"] = time_tiny(first)
    if not args.cost:
        recipes = ["tiny/covipal"] + (["tiny/covipal-e2e"] if args.e2e else [])
        settings = Settings(limit=args.limit, timing=False)
        accuracy: dict[str, list[float]] = {}
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            for name in recipes:
                run_dir = root / f"{name.split('/')[1]}-s{seed}"
                if not (run_dir / "metrics.json").is_file():
                    run_recipe(load_recipe(name, [f"seed={seed}", f"output={run_dir}", *args.set]))
                baselines = BASELINES if i == 0 and name == recipes[0] else []
                budgets = [int(t) for t in args.tokens.split(",")]
                report = evaluate(str(run_dir), baselines, budgets, settings=settings)
                for row in report["rows"]:
                    label = row["method"] if row["method"] != "model" else name
                    if row["method"] != "model" and not baselines:
                        continue
                    key = f"{label} @{row['budget']}" if row["budget"] is not None else label
                    accuracy.setdefault(key, []).append(row["accuracy"])
                print(json.dumps({"seed": seed, "recipe": name, "accuracy": accuracy}), flush=True)
        results["accuracy"] = accuracy
        with torch.no_grad():
            results["cost_tiny"] = time_tiny(first)
        print("| method | visual tokens | accuracy, mean (min–max) over runs |")
        print("|---|---|---|")
        for key, values in accuracy.items():
            label, _, budget = key.partition(" @")
            print(
                f"| {label} | {budget or 'its own'} | {100 * statistics.mean(values):.1f} % "
                f"({100 * min(values):.1f}–{100 * max(values):.1f}) |"
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
