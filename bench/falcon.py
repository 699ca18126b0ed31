"""FALCON on the tiny base: registers with ReAtten on and off against the MLP projector on the
same views (9× the tokens), on high-resolution scenes; and what registers + ReAtten cost.

    python bench/falcon.py [--seeds 0] [--limit 200] [--steps 300]   # trains seven runs per seed
    python bench/falcon.py --runs distill,mlp                         # only the runs named so
    python bench/falcon.py --runs distill --set trainer.threads=1     # one core per bench
    python bench/falcon.py --runs distill --skip copy                 # ... without the copy-initialised run
    python bench/falcon.py --runs distillation --indicators           # ... with crop indicators
    python bench/falcon.py --runs distill+copy --set "stages.1.components={falcon: {reatten_ramp: [0.5, 0.6]}}"
                                                 # ... ReAtten off until half-way, in full from 60 %
    python bench/falcon.py --cost                                     # only the vision-tower timing
    python bench/falcon.py --cost-real                                # ... at CLIP-L/336's widths
    python bench/falcon.py --rescore RUN [RUN ...] --limit 1000       # score kept runs, ReAtten on and off
    python bench/falcon.py --paired RUN_A RUN_B                      # two kept runs, question by question
    python bench/falcon.py --paired A0 B0 A1 B1 ...                  # ... one pair per seed, then over seeds

Per seed: `tiny/falcon` (ReAtten on), the same with `reatten: false`, both again with vtc's
register distillation as the first stage (`tiny/falcon-distill`, whose ReAtten starts with its
output zeroed; a third run starts it as the authors do, a full copy), `tiny/falcon-mlp`, and the
same MLP on the thumbnail alone (`model.views=null`: what the crops add; `--runs thumbnail`), each
fine-tuning the shipped base into a temporary folder, then scored on the held-out test images
(128 px, an 8×8 scene grid, a thumbnail + 2×2 crops): mean over families, per family, and
**across crops** — the questions whose grounded answer names cells in two or more of the 2×2
crops, which no single crop shows (for `match`, `data.synthetic.families`, the dot and the object
of its colour) — and **cut cells**, those resting on a cell a crop edge cuts in
two (none on this grid; `--set data.synthetic.grid=7` or 3×3 crops of a 192 px image make some,
README: FALCON). The crops are the run's one square grid of views (`model.views.grids`). With
`--indicators` every run writes FALCON's text crop indicators before each view (in words the
tiny tokenizer has: INDICATORS). Prints measured figures only; the README quotes them.
"""

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from recipe_overrides import add_set_option  # a sibling bench module
from transformers import LlavaConfig, LlavaForConditionalGeneration

from data.synth import Scene, dot_match, final_answer
from models.build import ComponentSpec, assemble, build
from models.compressors.falcon import FalconConfig
from models.flops import vision_flops
from models.views import ViewLayout
from train.accuracy import (
    answer_prior,
    answer_questions,
    mean_prior,
    normalize_answer,
    questions_of,
    synthetic_questions,
)
from train.accuracy import (
    paired as paired_right,
)
from train.datamodule import split_shards
from train.export import rebuild_run
from train.recipe import load_recipe, resolve_base
from train.run import run_recipe

REAL_WIDTH_RECIPE = "llava-1.5-7b/falcon/finetune"
RUNS = {
    "FALCON, ReAtten on": ("tiny/falcon", []),
    "FALCON, ReAtten off": ("tiny/falcon", ["model.compressors.0.reatten=false"]),
    # the recipe's ReAtten starts with its output projection zeroed (`reatten_init: copy-zero-out`)
    "FALCON + register distillation, ReAtten on": ("tiny/falcon-distill", []),
    "FALCON + register distillation, ReAtten on, copy-initialised (the authors')": (
        "tiny/falcon-distill",
        ["model.compressors.0.reatten_init=copy"],
    ),
    "FALCON + register distillation, ReAtten off": (
        "tiny/falcon-distill",
        ["model.compressors.0.reatten=false"],
    ),
    "MLP projector, same views": ("tiny/falcon-mlp", []),
    # what the crops add: the same MLP run on the whole image only, resized to the tower's input
    # (the thumbnail), 64 tokens per image; scored on the same questions, "across crops" included
    "Thumbnail only, no crops": ("tiny/falcon-mlp", ["model.views=null"]),
}


# where a kept run's scored answers go (`--keep`, `--rescore`), one JSON line per question
ANSWERS = "answers.jsonl"
ANSWERS_REATTEN_OFF = "answers-reatten-off.jsonl"

# FALCON's `<global_img>` / `<crop_img_row{r}_col{c}>` in words the tiny tokenizer knows.
INDICATORS = 'model.views.indicators={whole: "objects :", crop: "at {row} {col} :"}'


def crops_of_cell(row: int, col: int, grid: int, crops: int = 2) -> set[tuple[int, int]]:
    """The (row, col) crops of a `crops`×`crops` split that a scene cell overlaps: one, or two to
    four when the grid does not divide evenly and a crop edge cuts the cell (a 7×7 grid under 2×2
    crops cuts its middle row and column in half)."""

    def spans(index: int) -> list[int]:  # crops j whose [j/crops, (j+1)/crops) meets the cell's span
        return [j for j in range(crops) if j * grid < (index + 1) * crops and (j + 1) * grid > index * crops]

    return {(r, c) for r in spans(row) for c in spans(col)}


def cells_named(reference: str) -> list[tuple[int, int]]:
    """The (row, col) cells a grounded answer names before its ` . `."""
    return [
        (int(word[1]) - 1, ord(word[0]) - ord("a"))
        for word in reference.rsplit(" . ", 1)[0].split()
        if len(word) == 2 and word[0].isalpha() and word[1].isdigit()
    ]


def cells_of_answer(family: str, reference: str, scene: dict) -> list[tuple[int, int]]:
    """The (row, col) cells an answer rests on: those a grounded answer names; for `match` (the
    shape of the object of the dot's colour, whose answer names the colour, no cell), the dot's
    and that object's. `scene` is `Scene.to_json()`."""
    if family != "match":
        return cells_named(reference)
    parsed = Scene.from_json(scene)
    return [parsed.dot[:2]] + [(o.row, o.col) for o in dot_match(parsed)]


def crops_holding(cells: list[tuple[int, int]], grid: int, crops: int = 2) -> set[tuple[int, int]]:
    """The (row, col) crops of a `crops`×`crops` split that hold `cells`."""
    return {crop for cell in cells for crop in crops_of_cell(*cell, grid, crops)}


def cuts_a_cell(cells: list[tuple[int, int]], grid: int, crops: int = 2) -> bool:
    """Whether a crop edge cuts one of `cells` in two (never on an 8×8 grid)."""
    return any(len(crops_of_cell(*cell, grid, crops)) > 1 for cell in cells)


def score_run(
    run_dir: Path, limit: int, reatten: bool | None = None, answers_file: Path | None = None
) -> dict:
    """Accuracy of a trained run on the first `limit` test images. `reatten=False` switches the
    run's ReAtten off for this scoring only (ablation: does the trained model use it?); with
    ReAtten on, `reatten_share` says how much it adds to the registers, layer by layer.
    `answers_file` keeps every question's answer, scored, as JSON lines (for `--paired`)."""
    built = rebuild_run(run_dir)[0]
    falcon = next((c for c in built.model.compressors if isinstance(c.config, FalconConfig)), None)
    if reatten is not None and falcon is not None:
        falcon.config = dataclasses.replace(falcon.config, reatten=reatten)
    measured = ReattenShare(falcon) if falcon is not None and falcon.config.reatten else None
    recipe = load_recipe(run_dir / "recipe.yaml", check_machine=False)
    shards = split_shards(recipe.data, "test")
    questions = synthetic_questions(shards, limit)
    resting_on = {  # question id → the cells its answer rests on
        f"{index}-{turn}": cells_of_answer(family, answer, record["scene"])
        for index in range(min(limit, len(shards)))
        for record in [shards.record(index)]
        for turn, (family, _, answer) in enumerate(questions_of(record))
    }
    size = built.hf.config.vision_config.image_size
    grid = recipe.data.synthetic.grid
    if recipe.model.views is None:  # thumbnail only: label questions by the crops the others see,
        crops = recipe.data.synthetic.image_size // size  # one per tower input side
        view_grid = None
    else:
        (crops, cols), *others = recipe.model.views.grids  # this family has one square grid of crops
        if others or crops != cols:
            raise SystemExit(
                f"{run_dir}: the bench scores one square grid of crops, not {recipe.model.views.grids}"
            )
        view_grid = (crops, crops)
    answers = answer_questions(built.model, built.tokenizer, questions, size, progress=False)
    share = measured.close() if measured else None
    right, total, kept = defaultdict(int), defaultdict(int), []
    for q in questions.questions:
        ok = normalize_answer(final_answer(answers[q.id]["text"])) == normalize_answer(q.answers[0])
        cells = resting_on[q.id]
        groups = [q.family] + (["across crops"] if len(crops_holding(cells, grid, crops)) > 1 else [])
        groups += ["cut cells"] if cuts_a_cell(cells, grid, crops) else []
        for group in groups:
            right[group] += ok
            total[group] += 1
        kept.append(
            {"id": q.id, "question": q.text, "reference": q.answers[0], "groups": groups}
            | {"answer": answers[q.id]["text"], "right": ok}
        )
    if answers_file is not None:
        answers_file.write_text("".join(json.dumps(row) + "\n" for row in kept))
    families = {g: right[g] / total[g] for g in sorted(total) if g not in ("across crops", "cut cells")}
    prior = answer_prior(questions)
    return {
        "prior": {"mean": mean_prior(prior), "per_family": prior},
        "mean": sum(families.values()) / len(families),
        "per_family": families,
        "across_crops": right["across crops"] / max(total["across crops"], 1),
        "across_crops_count": total["across crops"],
        # answers resting on a cell a crop edge cuts in two: where ReAtten's continuity should help
        "cut_cells": right["cut cells"] / max(total["cut cells"], 1),
        "cut_cells_count": total["cut cells"],
        "visual_tokens": built.model.visual_tokens(view_grid),
    } | ({"reatten_share": share} if share else {})


class ReattenShare:
    """Hooks on every layer's ReAtten, for one scoring: per layer, Σ‖what ReAtten adds‖ /
    Σ‖what that layer's self-attention adds‖ over the valid registers (ReAtten reads the
    self-attention's output at the registers and is added to it; 0 where it adds nothing)."""

    def __init__(self, falcon) -> None:
        self.added = defaultdict(float)
        self.read = defaultdict(float)
        self.handles = [
            module.register_forward_hook(lambda m, args, out, i=i: self.record(i, *args, out))
            for i, module in enumerate(falcon.reatten)
        ]

    def record(self, layer: int, x: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
        # x: the self-attention's output at the registers, out: ReAtten's, both (images, views·M,
        # Dv); valid (images, views·M): padding rows are left out
        self.added[layer] += float(out.float().norm(dim=-1)[valid].sum())
        self.read[layer] += float(x.float().norm(dim=-1)[valid].sum())

    def close(self) -> list[float]:
        for handle in self.handles:
            handle.remove()
        return [round(self.added[i] / max(self.read[i], 1e-12), 4) for i in sorted(self.read)]


def train_and_score(
    seed: int,
    limit: int,
    steps: int | None,
    keep: str | None,
    runs: list[str],
    indicators: bool = False,
    extra: list[str] = (),
) -> dict:
    out = {}
    for label in runs:
        name, overrides = RUNS[label]
        if indicators:
            label, overrides = label + " + crop indicators", [*overrides, INDICATORS]
        with tempfile.TemporaryDirectory() as tmp:
            slug = "".join(c if c.isalnum() else "-" for c in label.lower())
            root = Path(keep) / f"{slug}-s{seed}" if keep else Path(tmp)
            shipped = load_recipe(name)
            more = [f"stages.{len(shipped.stages) - 1}.steps={steps}"] if steps else []
            if limit > shipped.data.synthetic.test:  # more test images: the first ones stay the same
                more.append(f"data.synthetic.test={limit}")
            recipe = load_recipe(
                name, [f"output={root}", f"seed={seed}", "eval.limit=1", *overrides, *more, *extra]
            )
            started = time.time()
            run_recipe(recipe, restart=True)
            answers_file = root / ANSWERS if keep else None
            out[label] = score_run(root, limit, answers_file=answers_file) | {
                "train_seconds": round(time.time() - started)
            }
            print(label, json.dumps(out[label]), flush=True)
    return out


def tiny_towers(overrides: list[str] = ()) -> tuple:
    """The shipped base with `tiny/falcon`'s FALCON after the bench's `--set` overrides (so the
    timing has the registers the runs train with): (model, component, image side in pixels)."""
    spec = load_recipe("tiny/falcon", overrides).model.compressors[0]
    model = build(resolve_base("tiny-llava"), compressors=[ComponentSpec(spec.name, spec.params)]).model
    return model.eval(), model.compressors[0], 64


def real_width_towers(recipe_name: str, vision_layers: int | None) -> tuple:
    """The tower of `recipe_name`'s base config at its real widths (random weights; all its
    layers, or the first `vision_layers`) with that recipe's FALCON. The LLM, which this timing
    never runs, is shrunk to one narrow layer so the model fits a small machine."""
    recipe = load_recipe(recipe_name, check_machine=False)
    spec = recipe.model.compressors[0]
    config = LlavaConfig.from_pretrained(resolve_base(recipe.model.base))
    text = config.text_config
    text.num_hidden_layers, text.hidden_size, text.intermediate_size = 1, 64, 128
    text.num_attention_heads = text.num_key_value_heads = 2
    text.head_dim = 32
    if vision_layers:
        config.vision_config.num_hidden_layers = vision_layers
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config)
    model = assemble(hf, ComponentSpec("mlp2x_gelu"), [ComponentSpec(spec.name, spec.params)])
    return model.eval(), model.compressors[0], config.vision_config.image_size


def arithmetic_overhead(vision_config, views: int, registers: int) -> dict:
    """FALCON's FLOPs over the plain tower's (all layers, as LLaVA runs it) for one image of
    `views` views, by vtc's counter (models/flops.py), minus one. `registers_and_reatten`: what
    the method adds — every layer runs `registers` more tokens per view, and ReAtten adds Q/K/V/O
    projections and attention over the image's views × registers tokens. `net`: the tower as vtc
    runs it, whose last layer computes the registers' rows only (the patches' outputs there are
    never read), which pays for part of it."""
    d, layers = vision_config.hidden_size, vision_config.num_hidden_layers
    plain = views * vision_flops(vision_config)
    with_registers = views * vision_flops(vision_config, extra_tokens=registers)
    rows_only = views * vision_flops(vision_config, extra_tokens=registers, last_layer_rows=registers)
    gathered = views * registers
    reatten = layers * 2.0 * (4 * gathered * d * d + 2 * gathered * gathered * d)
    return {
        "registers_and_reatten": round((with_registers + reatten) / plain - 1, 3),
        "net": round((rows_only + reatten) / plain - 1, 3),
    }


def tower_cost(towers: tuple, images: int, repeats: int, threads: int = 2) -> dict:
    """Median (and fastest) seconds of the vision tower on `images` images of a thumbnail + 2×2
    crops each: as LLaVA runs it, with FALCON's registers and ReAtten as vtc runs them (the last
    layer computes the registers' rows only), and the same with the whole last layer computed.
    All calls go through the same weights (the plain call passes no component), interleaved so
    drift hits them alike."""
    torch.set_num_threads(threads)
    model, component, size = towers
    layout = ViewLayout.from_grids(torch.tensor([[2, 2]] * images))
    pixels = torch.randn(len(layout), 3, size, size)
    calls = {
        "tower_s": lambda: model.vision(pixels, views=layout),
        "with_falcon_s": lambda: model.vision(pixels, encoder=component, in_layers=[component], views=layout),
        "with_falcon_whole_last_layer_s": lambda: whole_last_layer(
            lambda: model.vision(pixels, encoder=component, in_layers=[component], views=layout)
        ),
    }

    def whole_last_layer(call):  # the tower's own forward, every row of its last layer computed
        component.last_layer_rows = lambda: None
        try:
            return call()
        finally:
            del component.last_layer_rows

    times = defaultdict(list)
    with torch.no_grad():
        for i in range(repeats + 1):  # the first round warms up
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                if i:
                    times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    return {
        "views": len(layout),
        "registers": component.config.registers,
        "vision_layers": len(model.vision.layers()),
        **{name: round(t, 4) for name, t in median.items()},
        "overhead": round(median["with_falcon_s"] / median["tower_s"] - 1, 3),
        # what registers + ReAtten add when the last layer computes every row, as the tower would
        "overhead_whole_last_layer": round(
            median["with_falcon_whole_last_layer_s"] / median["tower_s"] - 1, 3
        ),
        # a busy neighbour only ever slows a call down: the fastest calls are the least disturbed
        "overhead_of_fastest": round(fastest["with_falcon_s"] / fastest["tower_s"] - 1, 3),
        "arithmetic_overhead": arithmetic_overhead(
            model.vision.model.config, len(layout) // images, component.config.registers
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--limit",
        type=int,
        default=200,
        help="test images (5 questions each); above the recipe's test split (500) the split grows",
    )
    parser.add_argument("--steps", type=int, help="steps of each recipe's last stage (default: the recipe's)")
    parser.add_argument("--keep", help="keep the runs under this folder")
    parser.add_argument(
        "--indicators", action="store_true", help="every run writes text crop indicators before each view"
    )
    parser.add_argument(
        "--runs",
        help="comma-separated words; only the runs whose label contains one (e.g. distill,mlp); "
        "parts joined by + must all be in it (distill+off)",
    )
    parser.add_argument(
        "--skip", help="comma-separated words; leave out the runs whose label contains one (e.g. copy)"
    )
    parser.add_argument(
        "--cost", action="store_true", help="only time the vision tower with and without FALCON"
    )
    parser.add_argument(
        "--cost-real",
        action="store_true",
        help=f"only time it at {REAL_WIDTH_RECIPE}'s real widths (CLIP-L/336, 64 registers; random weights)",
    )
    parser.add_argument(
        "--vision-layers", type=int, help="with --cost-real: time only this many tower layers"
    )
    parser.add_argument(
        "--rescore",
        nargs="+",
        metavar="RUN",
        help="only score these kept runs (from --keep) on --limit test images: as trained and, "
        "where ReAtten was on, again with it switched off at test; prints ReAtten's share per layer",
    )
    parser.add_argument(
        "--paired",
        nargs="+",
        metavar="A B",
        help="only compare two kept runs' scored answers (a run folder, or a file from --rescore "
        "such as RUN/answers-reatten-off.jsonl) question by question, with the exact McNemar test; "
        "several pairs (one per seed: A0 B0 A1 B1 ...) also get B − A over the pairs: mean, "
        "spread and an exact sign-flip test",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each (the median is printed)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the timings")
    add_set_option(parser, "trainer.threads=1 beside another job")
    args = parser.parse_args()
    words = args.runs.lower().split(",") if args.runs else [""]
    runs = [label for label in RUNS if any(all(p in label.lower() for p in w.split("+")) for w in words)]
    skips = args.skip.lower().split(",") if args.skip else []
    runs = [label for label in runs if not any(word in label.lower() for word in skips)]
    if not runs:
        parser.error(f"--runs {args.runs!r} names none of: {' | '.join(RUNS)}")
    if args.rescore:
        rescore(args.rescore, args.limit)
        return
    if args.paired:
        if len(args.paired) % 2:
            parser.error(f"--paired takes runs two by two (A B, one pair per seed); got {len(args.paired)}")
        print_paired(args.paired)
        return
    if args.cost_real:
        towers = real_width_towers(REAL_WIDTH_RECIPE, args.vision_layers)
        print("cost", json.dumps(tower_cost(towers, 1, args.repeats, args.threads)), flush=True)
        return
    print("cost", json.dumps(tower_cost(tiny_towers(args.set), 8, args.repeats, args.threads)), flush=True)
    if args.cost:
        return
    results = {
        seed: train_and_score(int(seed), args.limit, args.steps, args.keep, runs, args.indicators, args.set)
        for seed in args.seeds.split(",")
    }
    print_table(results)


def rescore(run_dirs: list[str], limit: int) -> None:
    """Score kept runs again; a run trained with ReAtten on also with it switched off at test,
    which says whether the trained model uses what ReAtten adds."""
    print("| run | ReAtten at test | mean | across crops | cut cells | ReAtten adds (per layer) |")
    for run_dir in map(Path, run_dirs):
        trained = score_run(run_dir, limit, answers_file=run_dir / ANSWERS)
        rows = [("as trained", trained)]
        if "reatten_share" in trained:
            off = score_run(run_dir, limit, reatten=False, answers_file=run_dir / ANSWERS_REATTEN_OFF)
            rows.append(("switched off", off))
        for how, r in rows:
            print(json.dumps({"run": str(run_dir), "reatten_at_test": how} | r), flush=True)
            share = ", ".join(f"{x:.1%}" for x in r.get("reatten_share", [])) or "-"
            print(
                f"| {run_dir.name} | {how} | {r['mean']:.1%} | {r['across_crops']:.1%} "
                f"(n={r['across_crops_count']}) | {r['cut_cells']:.1%} (n={r['cut_cells_count']}) | {share} |",
                flush=True,
            )


def read_answers(path: str) -> dict[str, dict]:
    """A kept run's scored answers, {question id: row}: from its folder (`answers.jsonl`) or a file."""
    path = Path(path)
    path = path / ANSWERS if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{path}: no scored answers (score the run with --rescore to keep them)")
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def paired(path_a: str, path_b: str) -> list[dict]:
    """Two runs scored on the same questions, compared question by question, per group (family,
    across crops, cut cells, all): right by each, right by one only, and the exact McNemar p.
    It says whether the two models differ on these questions, not whether another seed would
    differ the same way."""
    a, b = read_answers(path_a), read_answers(path_b)
    asked = ("question", "reference")  # the same id on other data asks or expects otherwise
    if a.keys() != b.keys() or any(a[i][k] != b[i][k] for i in a for k in asked):
        raise SystemExit(f"{path_a} and {path_b} were not scored on the same questions")
    rows = []
    for group in ["all", *sorted({g for row in a.values() for g in row["groups"]})]:
        ids = [i for i in a if group == "all" or group in a[i]["groups"]]
        split = paired_right({i: a[i]["right"] for i in ids}, {i: b[i]["right"] for i in ids})
        rows.append(
            {"group": group, "n": len(ids)}
            | {
                "a": sum(a[i]["right"] for i in ids) / len(ids),
                "b": sum(b[i]["right"] for i in ids) / len(ids),
            }
            | {"only_a": split["only_a"], "only_b": split["only_b"], "p": split["p"]}
        )
    return rows


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided exact sign-flip (randomisation) p-value of a mean difference over pairs: the
    share of the 2^n ways of flipping the pairs' signs whose sum is at least as far from 0, were
    A and B equally good whatever the seed. With n pairs it is never below 2 / 2^n."""
    observed = abs(sum(differences)) - 1e-9  # a flipped sum equal to it counts, whatever the rounding
    sums = [
        sum(s * d for s, d in zip(signs, differences, strict=True))
        for signs in itertools.product((1, -1), repeat=len(differences))
    ]
    return sum(abs(total) >= observed for total in sums) / len(sums)


def over_pairs(pairs: list[list[dict]]) -> list[dict]:
    """`paired` rows of several pairs (one per seed), per group: B − A of each pair in points,
    their mean, standard deviation and standard error, how many pairs B leads, and the sign-flip
    p. Unlike McNemar's p this asks whether another seed would differ the same way."""
    groups = [r["group"] for r in pairs[0]]
    if any([r["group"] for r in rows] != groups for rows in pairs):
        raise SystemExit("the pairs were not scored on the same groups of questions")
    summary = []
    for i, group in enumerate(groups):
        differences = [100 * (rows[i]["b"] - rows[i]["a"]) for rows in pairs]
        sd = statistics.stdev(differences)
        summary.append(
            {"group": group, "n": [rows[i]["n"] for rows in pairs], "b_minus_a": differences}
            | {"mean": statistics.mean(differences), "sd": sd, "se": sd / math.sqrt(len(differences))}
            | {"b_ahead": sum(d > 0 for d in differences), "p": sign_flip_p(differences)}
        )
    return summary


def print_paired(paths: list[str]) -> None:
    """Each pair question by question; with several pairs, B − A over them."""
    pairs = []
    for path_a, path_b in zip(paths[::2], paths[1::2], strict=True):
        print(f"A = {path_a}\nB = {path_b}")
        print("| questions | n | A | B | B − A | right by A only | by B only | exact McNemar p |")
        pairs.append(paired(path_a, path_b))
        for r in pairs[-1]:
            print(json.dumps(r), flush=True)
            print(
                f"| {r['group']} | {r['n']} | {r['a']:.1%} | {r['b']:.1%} | {100 * (r['b'] - r['a']):+.1f} | "
                f"{r['only_a']} | {r['only_b']} | {r['p']:.2g} |",
                flush=True,
            )
    if len(pairs) < 2:
        return
    print(f"over the {len(pairs)} pairs (B − A in points, one pair per seed)")
    print("| questions | B − A, pair by pair | mean | sd | se | B ahead in | sign-flip p |")
    for r in over_pairs(pairs):
        print(json.dumps({"over_pairs": True} | r), flush=True)
        print(
            f"| {r['group']} | {', '.join(f'{d:+.1f}' for d in r['b_minus_a'])} | {r['mean']:+.1f} | "
            f"{r['sd']:.1f} | {r['se']:.1f} | {r['b_ahead']} of {len(pairs)} | {r['p']:.2g} |",
            flush=True,
        )


def mean_and_range(rows: list[dict], key: str) -> str:
    """`54.0 % (52.1–55.9)` over seeds, or the one value."""
    values = [r[key] for r in rows]
    text = f"{statistics.mean(values):.1%}"
    return text + (f" ({min(values):.1%}–{max(values):.1%})" if len(values) > 1 else "")


def print_table(results: dict) -> None:
    first = next(iter(next(iter(results.values())).values()))
    families = list(first["per_family"])
    print(
        "| run | visual tokens / image | mean | across crops | cut cells | "
        + " | ".join(families)
        + " | ReAtten adds, by layer | train s |"
    )
    prior = first["prior"]
    print(
        f"| answer prior (the most common answer) | | {prior['mean']:.1%} | | | "
        + " | ".join(f"{prior['per_family'][f]:.1%}" for f in families)
        + " | | |"
    )
    for label in next(iter(results.values())):
        rows = [results[seed][label] for seed in results]
        per_family = " | ".join(f"{statistics.mean(r['per_family'][f] for r in rows):.1%}" for f in families)
        seconds = statistics.mean(r["train_seconds"] for r in rows)
        print(
            f"| {label} | {rows[0]['visual_tokens']} | {mean_and_range(rows, 'mean')} | "
            f"{mean_and_range(rows, 'across_crops')} (n={rows[0]['across_crops_count']}) | "
            f"{mean_and_range(rows, 'cut_cells')} (n={rows[0]['cut_cells_count']}) | {per_family} | "
            f"{reatten_shares(rows)} | {seconds:.0f} |"
        )


def reatten_shares(rows: list[dict]) -> str:
    """ReAtten's share of the registers' attention update per tower layer, mean over the seeds'
    runs (`ReattenShare`); '-' for runs without ReAtten."""
    shares = [r["reatten_share"] for r in rows if r.get("reatten_share")]
    if not shares:
        return "-"
    return ", ".join(f"{100 * statistics.mean(layer):.1f}" for layer in zip(*shares, strict=True)) + " %"


if __name__ == "__main__":
    main()
