"""DyVTE on the tiny base: exit labels per layer, then the trained routers against FastV and
PyramidDrop at the same mean number of visual tokens over the LLM's layers.

    python bench/dyvte.py [--seeds 0,1,2] [--keep DIR] [--limit 500]
    python bench/dyvte.py --labels      # only the exit-label rate per layer (a minute)
    python bench/dyvte.py --labels --set data.turns=null   # ... on the full conversations
    python bench/dyvte.py --recipe tiny/dyvte-deep  # the 8-layer shipped base, loss threshold 2x
    python bench/dyvte.py --set model.base=run:NAME   # on another base (a base run, checkpoints/NAME)
    python bench/dyvte.py --bound --limit 500  # the most any exit policy can save (a minute)

Labels: on 8 training batches of the recipe's base (`--recipe`, default `tiny/dyvte` on the
shipped 4-layer base; or the one `--set model.base=...` names),
the share of samples the authors' rule labels "exit" at each router layer (it should rise with
depth on a base that uses the image), overall and by the family of the sample's question, and
the share of layers that would see the image if every sample exited at its first layer labelled
"exit" — the most routers trained on these labels can save. Then, per seed, the recipe
trains the routers and `vtc evaluate` measures the routed model (exit-layer histogram,
accuracy, FLOPs); FastV and PyramidDrop are measured at the routed model's mean visual
tokens over layers, rounded. Prefill FLOPs saved are computed from the exit histogram (the
per-layer counts of one prompt would not describe a dynamic method), and the routers' measured
time against the prefill's (and, on the LLaVA-1.5-7B shapes, their FLOPs against the prefill's).
`--bound` needs no routers and no label rule: it forces every sample to exit after each layer in
turn and lets each test question take its earliest exit that keeps its answer (`exit_bound`),
which bounds what any router can save at a given accuracy kept.
Prints measured figures only; the README quotes them.
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from recipe_overrides import add_set_option  # a sibling bench module

from data.dataset import ConversationDataset, collate
from models.compressors.dyvte import answer_scores, exit_labels
from models.flops import prefill_flops
from train.datamodule import split_shards
from train.evaluate import Settings, evaluate
from train.recipe import load_recipe, resolve_base
from train.run import build_from_recipe, run_recipe


@torch.no_grad()
def label_rates(name: str, overrides: list[str], batches: int = 8, batch_size: int = 32) -> dict:
    """Per router layer on training batches of the frozen base of recipe `name` (with
    `overrides`): the share of 'exit' labels, the mean argmax agreement of the two
    continuations' answers, and the median ratio of the hidden-image loss to the normal one."""
    recipe = load_recipe(name, overrides)
    built = build_from_recipe(recipe)
    model = built.model.eval()
    component = model.compressors[0]
    data = ConversationDataset(
        split_shards(recipe.data, "train"),
        built.tokenizer,
        "vicuna_v1",
        built.hf.config.vision_config.image_size,
        model.image_token_id,
        512,
        model.visual_tokens(),
        turns=recipe.data.turns,
    )
    # the family of each sample's (only) question, to see which answers can leave the image early
    families = [data.shards.record(j)["families"][0] for j in range(batches * batch_size)]
    rates, agreements, ratios, per_layer = [], [], [], []
    for layer in range(len(component.routers)):
        labels, agree, ratio, answered = [], [], [], []
        for i in range(batches):
            items = [data[j] for j in range(i * batch_size, (i + 1) * batch_size)]
            batch = collate(items, built.tokenizer.pad_token_id)
            args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
            state = model.prepare(*args)
            head = model.llm.run(state, stop=layer + 1)
            normal = model.llm.run(head, start=layer + 1)
            masked = model.llm.run(head.hide_visual_keys(), start=layer + 1)
            label, has_answer = exit_labels(
                normal, masked, model.llm.lm_head, component.config.agreement, component.config.loss_ratio
            )
            labels.append(label[has_answer].float())
            answered.append(has_answer)
            normal_loss, normal_top, where = answer_scores(normal, model.llm.lm_head)
            masked_loss, masked_top, _ = answer_scores(masked, model.llm.lm_head)
            rows = where.nonzero()[:, 0]
            count = where.sum(1).clamp(min=1)

            def per_sample(values, rows=rows, count=count):
                return torch.zeros(len(count)).index_add(0, rows, values.float()) / count

            agree.append(per_sample(normal_top == masked_top)[has_answer])
            ratio.append((per_sample(masked_loss) / per_sample(normal_loss))[has_answer])
        per_layer.append(torch.cat(labels).bool())
        rates.append(round(float(per_layer[-1].float().mean()), 4))
        agreements.append(round(float(torch.cat(agree).mean()), 4))
        ratios.append(round(float(torch.cat(ratio).median()), 3))
    labels = torch.stack(per_layer, 1)  # (samples with answer tokens, routers)
    # which samples have answer tokens does not depend on the layer: the last layer's say
    families = [f for f, a in zip(families, torch.cat(answered).tolist(), strict=True) if a]
    by_family = {}
    for family in sorted(set(families)):
        rows = torch.tensor([f == family for f in families])
        by_family[family] = [round(float(rate), 4) for rate in labels[rows].float().mean(0)]
    return {
        "exit_label_rate": rates,
        "exit_label_rate_by_family": by_family,
        "samples_by_family": {family: families.count(family) for family in sorted(set(families))},
        "answer_agreement_mean": agreements,
        "loss_ratio_median": ratios,
        "oracle_visual_layer_share": round(oracle_share(labels, model.llm.num_layers), 4),
    }


def oracle_share(labels: torch.Tensor, layers: int) -> float:
    """The share of the LLM's layers that would see the visual tokens, mean over samples, if every
    sample exited at its first router layer labelled "exit" (labels (N, routers) bool; router k
    exits before layer k + 1): what perfect routers could save under the authors' label rule."""
    routers = labels.shape[1]
    first = torch.where(labels.any(1), labels.float().argmax(1), torch.full((len(labels),), routers))
    return layer_share(first.tolist(), routers, layers)


@torch.no_grad()
def exit_bound(name: str, overrides: list[str], limit: int) -> dict:
    """The most any exit policy can save on the test questions of recipe `name`'s base, whatever
    its routers or label rule: every question is answered with all samples forced to exit after
    layer k, for each router layer k, and once without exits; then each question takes the
    earliest exit at which its final answer is the same as without exits (`same_answers`:
    accuracy kept 100 % by construction), or at which a question answered right stays right
    (`right_stays_right`: a wrong answer may exit after the first layer, so accuracy kept is
    ≥ 100 %), and the same
    spending accuracy down to 99 % kept (`accuracy_kept_99`, `spend_slack`). Also the accuracy
    kept and the FLOPs saved when every sample exits after layer k."""
    from train.accuracy import (
        answer_questions,
        normalize_answer,
        right_answers,
        score,
        synthetic_questions,
    )
    from train.evaluation.measure import prompt_batch, text_tokens

    recipe = load_recipe(name, overrides)
    built = build_from_recipe(recipe)
    model = built.model.eval()
    component = model.compressors[0]
    questions = synthetic_questions(split_shards(recipe.data, "test"), limit)
    size = built.hf.config.vision_config.image_size
    layers, routers = model.llm.num_layers, len(component.routers)
    finals, right, accuracy = [], [], []
    for exit_after in [None, *range(routers)]:  # None: no sample exits (the base)
        # an instance attribute shadows the routers' decision for these answers only
        component.wants_exit = lambda layer, state, k=exit_after: torch.full(
            state.attention_mask.shape[:1], layer == k, device=state.attention_mask.device
        )
        answers = answer_questions(model, built.tokenizer, questions, size, progress=False)
        finals.append(
            {q: normalize_answer(questions.answer_of(a["text"])) for q, a in answers.items() if "text" in a}
        )
        right.append(right_answers(questions, answers))
        accuracy.append(score(questions, answers)["accuracy"])
    del component.wants_exit
    ids = list(right[0])

    def seen(keep) -> float:  # mean share of layers that see the image, earliest exit `keep` allows
        first = [next((k for k in range(routers) if keep(q, k)), routers) for q in ids]
        return layer_share(first, routers, layers)

    config, visual = built.hf.config, model.visual_tokens()
    text = text_tokens(model, prompt_batch(built, questions, size, 1))
    full = routed_flops(config, text, visual, 1.0)

    def saved(share: float) -> float:  # LLM prefill FLOPs saved at that mean share of layers
        return flops_saved(config, text, visual, share, full)

    policies = {
        "same_answers": seen(lambda q, k: finals[k + 1][q] == finals[0][q]),
        "right_stays_right": seen(lambda q, k: right[k + 1][q] or not right[0][q]),
        "accuracy_kept_99": spend_slack(questions, ids, right, layers, 0.99),
    }
    return {
        "questions": len(ids),
        "accuracy_kept_if_all_exit_after_layer": [round(a / accuracy[0], 4) for a in accuracy[1:]],
        "llm_flops_saved_if_all_exit_after_layer": [saved((k + 1) / layers) for k in range(routers)],
        **{
            name: {"visual_layer_share": round(share, 4), "llm_flops_saved": saved(share)}
            for name, share in policies.items()
        },
        "text_tokens": text,
    }


@torch.no_grad()
def confidence_sweep(run_dir: Path, confidences: list[float], limit: int) -> dict:
    """A kept run's routers at each exit confidence (`exit_confidence`: exit iff P(exit) is above
    it; 0.5 is the authors' argmax), on two disjoint halves of the test split: `choose`, test
    images limit..2·limit−1, where a confidence may be picked, and `report`, images 0..limit−1,
    where it is then measured. Per half and confidence: accuracy kept (of the routers' own frozen
    base) and LLM prefill FLOPs saved (`routed_flops` at the mean share of layers that saw the
    image, the first report prompt's text tokens)."""
    from models.build import ComponentSpec
    from train.accuracy import QuestionSet, answer_questions, score, synthetic_questions
    from train.evaluation.measure import prompt_batch, text_tokens
    from train.export import rebuild_run

    recipe = load_recipe(run_dir / "recipe.yaml", [f"data.synthetic.test={2 * limit}"], check_machine=False)
    every = synthetic_questions(split_shards(recipe.data, "test"), 2 * limit)
    halves = {
        name: QuestionSet(
            [q for q in every.questions if keep(int(q.image))], every.read_image, answer_of=every.answer_of
        )
        for name, keep in (("choose", lambda i: i >= limit), ("report", lambda i: i < limit))
    }
    base = rebuild_run(run_dir, [])[0]
    size = base.hf.config.vision_config.image_size
    base_accuracy = {
        name: score(qs, answer_questions(base.model, base.tokenizer, qs, size, progress=False))["accuracy"]
        for name, qs in halves.items()
    }
    spec = recipe.model.compressors[0]
    text = text_tokens(base.model, prompt_batch(base, halves["report"], size, 1))
    visual = base.model.visual_tokens()
    full = routed_flops(base.hf.config, text, visual, 1.0)
    out = {}
    for confidence in confidences:
        built = rebuild_run(
            run_dir, [ComponentSpec(spec.name, {**spec.params, "exit_confidence": confidence})]
        )[0]
        component, row = built.model.compressors[0].eval(), {}
        for name, qs in halves.items():
            component.reset_statistics()
            answers = answer_questions(built.model, built.tokenizer, qs, size, progress=False)
            share = component.statistics()["visual_layer_share"]
            row[name] = {
                "accuracy_kept": round(score(qs, answers)["accuracy"] / base_accuracy[name], 4),
                "llm_flops_saved": flops_saved(base.hf.config, text, visual, share, full),
            }
        out[str(confidence)] = row
    return out


def spend_slack(questions, ids: list[str], right: list[dict], layers: int, kept: float) -> float:
    """Mean share of layers that see the image under an exit policy that knows every answer and
    keeps the accuracy (mean over families, as `vtc evaluate` scores it) ≥ `kept` × the base's:
    start from the earliest exits that keep every right answer right (a wrong one exits after the
    first layer, and may turn right), then send right answers to the first exit, most layers
    saved per accuracy lost first, while the accuracy allows (greedy: the best such policy up to
    one answer's weight, as the families' sizes differ little). `right[0]` are the base's
    answers, `right[k + 1]` those with every sample exiting after layer k."""
    family = {q.id: q.family for q in questions.questions}
    sizes = {f: sum(family[q] == f for q in ids) for f in set(family[q] for q in ids)}
    weight = {q: 1 / (sizes[family[q]] * len(sizes)) for q in ids}  # one answer's share of accuracy
    routers = len(right) - 1
    first, accuracy = {}, 0.0
    for q in ids:
        k = next((k for k in range(routers) if right[k + 1][q] or not right[0][q]), routers)
        first[q] = k
        accuracy += weight[q] * (right[k + 1][q] if k < routers else right[0][q])
    base = sum(weight[q] * right[0][q] for q in ids)
    slack = accuracy - kept * base
    moves = sorted((q for q in ids if first[q] > 0 and not right[1][q]), key=lambda q: -first[q] / weight[q])
    for q in moves:  # each costs its weight and saves `first[q]` layers
        if weight[q] > slack:
            continue
        slack -= weight[q]
        first[q] = 0
    return layer_share(list(first.values()), routers, layers)


def layer_share(first: list[int], routers: int, layers: int) -> float:
    """Mean share of the LLM's layers that see the image when each sample exits at its router
    `first` (router k exits before layer k + 1; `routers`: never exits)."""
    return sum(k + 1 if k < routers else layers for k in first) / (len(first) * layers)


def routed_flops(config, text: int, visual: int, share: float) -> float:
    """LLM prefill FLOPs when the visual tokens are seen by `share` of the layers on average
    (linear in the per-layer token count, up to the attention's quadratic term)."""
    layers = config.text_config.num_hidden_layers
    full = prefill_flops(config, text, visual).as_dict()["llm"]
    none = prefill_flops(config, text, visual, [text] * layers).as_dict()["llm"]
    return none + share * (full - none)


def flops_saved(config, text: int, visual: int, share: float, full: float) -> float:
    """The share of `full` LLM prefill FLOPs saved when the visual tokens are seen by `share` of
    the layers on average (`routed_flops`), rounded to 4 places as the bench prints it."""
    return round(1 - routed_flops(config, text, visual, share) / full, 4)


def router_flops_7b(text: int = 60, visual: int = 576) -> dict:
    """The routers' FLOPs on one LLaVA-1.5-7B prompt (31 of them: after every layer but the
    last; counted by torch on meta tensors, shapes only) against the LLM's prefill FLOPs."""
    from covipal import one_prompt_state  # a sibling bench
    from torch.utils.flop_counter import FlopCounterMode

    from models.build import build, dims_of
    from models.compressors import build_component

    config = build(resolve_base("models/configs/llava-1.5-7b-hf"), device="meta").hf.config
    dims = dims_of(config)
    with torch.device("meta"):
        component = build_component("dyvte", {}, dims)
        state = one_prompt_state(dims.llm_width, visual, text)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            for router in component.routers:
                router(component.feature(state))
    prefill = prefill_flops(config, text + 1, visual).as_dict()["llm"]
    return {
        "routers_gflops": round(counter.get_total_flops() / 1e9, 2),
        "llm_prefill_tflops": round(prefill / 1e12, 2),
        "share": round(counter.get_total_flops() / prefill, 6),
    }


def router_seconds(run_dir: Path, repeats: int = 20) -> dict:
    """Median time of all routers on one batch-8 prefill state (their MLPs and features, the
    feature weights built once as in a prefill) vs. the base's prefill time."""
    from train.accuracy import synthetic_questions
    from train.evaluation.measure import generate, prompt_batch, timed
    from train.export import rebuild_run

    recipe = load_recipe(run_dir / "recipe.yaml")
    built = rebuild_run(run_dir, [])[0]
    size = built.hf.config.vision_config.image_size
    batch = prompt_batch(built, synthetic_questions(split_shards(recipe.data, "test"), 8), size, 8)
    routed = rebuild_run(run_dir)[0]
    component = routed.model.compressors[0].eval()
    with torch.no_grad():
        state = routed.model.prepare(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], padding_side="left"
        )
    prefill = timed(lambda: generate(built, batch, 1), repeats)

    def all_routers():  # as in one prefill: a new layout, so the feature weights are built once
        fresh = replace(state, attention_mask=state.attention_mask.clone())
        return [component.wants_exit(k, fresh) for k in range(len(component.routers))]

    routers = timed(all_routers, repeats)
    return {
        "prefill_ms": round(prefill * 1000, 2),
        "routers_ms": round(routers * 1000, 3),
        "share": round(routers / prefill, 4),
    }


def trained_run(args, root: Path, seed: int) -> Path:
    """The run of `args.recipe` for `seed` in `root`: a kept one as it is, else trained now."""
    run_dir = root / f"dyvte-s{seed}"
    if not (run_dir / "metrics.json").is_file():
        run_recipe(load_recipe(args.recipe, [*args.set, f"seed={seed}", f"output={run_dir}"]))
    return run_dir


def sweep(args) -> None:
    """`--confidence`: the exit-confidence sweep of every seed's run, then the smallest confidence
    at which every seed keeps ≥ 99 % of the accuracy on the `choose` half, reported on the other."""
    if not args.keep:
        raise SystemExit("--confidence sweeps kept runs: name their folder with --keep")
    confidences = sorted(float(c) for c in args.confidence.split(","))
    sweeps = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        sweeps[seed] = confidence_sweep(trained_run(args, Path(args.keep), seed), confidences, args.limit)
        print(json.dumps({"seed": seed, "sweep": sweeps[seed]}), flush=True)
    for confidence in map(str, confidences):
        for half in ("choose", "report"):
            rows = [sweeps[seed][confidence][half] for seed in sweeps]
            kept, saved = ([r[key] for r in rows] for key in ("accuracy_kept", "llm_flops_saved"))
            print(
                f"confidence {confidence} {half:6}: accuracy kept {100 * min(kept):.1f}–{100 * max(kept):.1f} %, "
                f"LLM prefill FLOPs saved {100 * min(saved):.1f}–{100 * max(saved):.1f} % (seeds {list(sweeps)})"
            )
    chosen = next(
        (
            c
            for c in map(str, confidences)
            if all(sweeps[s][c]["choose"]["accuracy_kept"] >= 0.99 for s in sweeps)
        ),
        None,
    )
    print(f"smallest confidence keeping >= 99 % on every seed's choose half: {chosen}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", default="tiny/dyvte", help="the DyVTE recipe (default tiny/dyvte; tiny/dyvte-deep)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--limit", type=int, default=500, help="test images per accuracy figure")
    parser.add_argument("--labels", action="store_true", help="only the exit-label rate per layer")
    parser.add_argument(
        "--bound",
        action="store_true",
        help="only the most any exit policy can save on --limit test images (forced exits)",
    )
    parser.add_argument(
        "--confidence",
        help="only sweep the exit confidence of the --keep runs (trained first where missing), "
        "comma-separated, e.g. 0.5,0.7,0.9: picked on test images limit..2*limit-1, reported on 0..limit-1",
    )
    add_set_option(
        parser, "data.turns=null (the full conversations, with --labels) or model.base=tiny-llava-8l"
    )
    args = parser.parse_args()
    # the recipe's threads (`--set trainer.threads=1` beside another job), else the machine's 2
    recipe = load_recipe(args.recipe, args.set)
    torch.set_num_threads(recipe.trainer.threads or 2)
    started = time.time()
    if args.limit > recipe.data.synthetic.test:
        # more test images than the recipe makes: make more (the first ones stay the same)
        args.set.append(f"data.synthetic.test={args.limit}")
    if args.bound:
        print(json.dumps({"exit_bound": exit_bound(args.recipe, args.set, args.limit)}, indent=1))
        return
    if args.confidence:
        sweep(args)
        return
    results = {"labels_per_layer": label_rates(args.recipe, args.set)}
    print(json.dumps(results), flush=True)
    if not args.labels:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dyvte-bench-"))
        settings = Settings(limit=args.limit, timing=False)
        # the model's shape, for the FLOPs; the test images added to args.set above do not change it
        config = build_from_recipe(recipe).hf.config
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = trained_run(args, root, seed)
            report = evaluate(str(run_dir), [], None, settings=settings)
            rows = {r["method"]: r for r in report["rows"]}
            base, model = rows["baseline"], rows["model"]
            counted = model["statistics"]["dyvte"]
            share = counted["visual_layer_share"]
            visual = round(base["visual_tokens"])  # the uncompressed prompt's image tokens
            text = base["layer_tokens"][0] - visual
            saved = flops_saved(config, text, visual, share, base["flops"]["llm"])
            oracle = results["labels_per_layer"]["oracle_visual_layer_share"]
            oracle_saved = flops_saved(config, text, visual, oracle, base["flops"]["llm"])
            budget = max(1, round(visual * share))
            others = evaluate(
                str(run_dir),
                ["fastv", "pdrop"],
                [budget],
                settings=settings,
                out_dir=run_dir / "eval-baselines",
            )
            runs.append(
                {
                    "seed": seed,
                    "accuracy_kept": round(model["accuracy"] / base["accuracy"], 4),
                    "llm_flops_saved": saved,
                    # perfect routers under the label rule (labels of training samples)
                    "llm_flops_saved_by_oracle_routers": oracle_saved,
                    "exit_layers": counted["exit_layers"],
                    "mean_visual_tokens_over_layers": round(visual * share, 2),
                    "baselines_at_that_mean": {
                        f"{r['method']}@{r['budget']}": round(r["accuracy"] / base["accuracy"], 4)
                        for r in others["rows"]
                        if r["budget"] is not None
                    },
                }
            )
            print(json.dumps(runs[-1]), flush=True)
        results["runs"] = runs
        results["router_time"] = router_seconds(root / f"dyvte-s{args.seeds.split(',')[0]}")
        results["router_flops_7b"] = router_flops_7b()
        kept = [r["accuracy_kept"] for r in runs]
        saved = [r["llm_flops_saved"] for r in runs]
        print(
            f"accuracy kept {100 * statistics.mean(kept):.1f} % ({100 * min(kept):.1f}–{100 * max(kept):.1f}), "
            f"LLM prefill FLOPs saved {100 * statistics.mean(saved):.1f} % ({100 * min(saved):.1f}–{100 * max(saved):.1f})"
        )
    results["seconds"] = round(time.time() - started)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
