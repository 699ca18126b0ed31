"""`vtc` command line. Each sub-command is one function; read top to bottom."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from data.synth import ASKED, EXTRA_FAMILIES
from train.schema import Range
from train.signals import stop_signals_exit

EPILOG = """examples:
  vtc train                                   the main job: TokenPacker on the shipped tiny base,
                                              then compared with training-free baselines
  vtc train tiny/mlp stages.1.steps=50        a shipped recipe with an override
  vtc train tiny/base                         reproduce the shipped tiny base from scratch (~50 min)
  vtc validate recipes/tiny/tokenpacker.yaml  check a recipe without building anything heavy
  vtc plan llava-1.5-7b/tokenpacker/finetune --samples 665298 --gpu-mem 80GB
                                              memory, steps, FLOPs and time before renting GPUs
  vtc data synth --out data/synth --samples 1000
  vtc data convert llava.json --images imgs/ --out shards/
"""


def cmd_recipes(args) -> int:
    from train.recipe import RECIPES_DIR, RecipeError, load_recipe

    paths = sorted(RECIPES_DIR.rglob("*.yaml"))
    names = [str(path.relative_to(RECIPES_DIR).with_suffix("")) for path in paths]
    width = max(map(len, names), default=0)
    for path, name in zip(paths, names, strict=True):
        try:
            description = load_recipe(path, check_machine=False).description
        except (RecipeError, FileNotFoundError) as err:
            description = f"(invalid: {str(err).splitlines()[0]})"
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_validate(args) -> int:
    from train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_machine=not args.anywhere)
    print(f"{recipe.source}: ok — {len(recipe.stages)} stage(s): " + ", ".join(s.name for s in recipe.stages))
    return 0


def cmd_plan(args) -> int:
    from train.plan import format_plan, plan_recipe
    from train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_machine=False)
    plans = plan_recipe(recipe, samples=None if args.samples is None else int(args.samples))
    report, warnings = format_plan(recipe, plans, args.tflops, args.gpu_mem)
    print(report)
    for warning in warnings:
        print(f"[vtc] WARNING: {warning}", file=sys.stderr)
    return 1 if warnings else 0


def cmd_train(args) -> int:
    from train.recipe import DEFAULT_RECIPE, load_recipe
    from train.run import run_dir_of, run_recipe

    overrides = list(args.overrides)
    if args.recipe and "=" in args.recipe and not Path(args.recipe).exists():  # `vtc train key=value ...`
        overrides.insert(0, args.recipe)
        args.recipe = None
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE, overrides)
    print(f"[vtc] recipe {recipe.source} → {run_dir_of(recipe)}")
    metrics = run_recipe(recipe, resume=args.resume, force=args.force, restart=args.restart)
    report(recipe, metrics)
    return 0


def cmd_resume(args) -> int:
    from train.recipe import load_recipe
    from train.run import run_recipe

    recipe_file = Path(args.run_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no recipe.yaml)")
    recipe = load_recipe(recipe_file, args.overrides)
    metrics = run_recipe(recipe, resume="auto", force=args.force)
    report(recipe, metrics)
    return 0


def report(recipe, metrics: dict) -> None:
    from train.run import run_dir_of

    if metrics and "accuracy" not in metrics:  # eval.after_training: false
        print(f"[vtc] trained in {metrics['train_seconds']:.0f} s; weights in {run_dir_of(recipe)}")
    elif metrics:
        prior = metrics.get("answer_prior", {})
        families = "  ".join(
            f"{k} {v:.1%}" + (f" (prior {prior[k]:.0%})" if k in prior else "")
            for k, v in metrics["per_family"].items()
        )
        tokens = f"{metrics['visual_tokens']:g} visual tokens into the LLM"
        layer_mean = metrics.get("visual_tokens_layer_mean", metrics["visual_tokens"])
        if round(layer_mean, 1) != round(metrics["visual_tokens"], 1):  # pruned inside the LLM
            tokens += f", {layer_mean:.1f} a layer on mean"
        print(
            f"[vtc] held-out accuracy {metrics['accuracy']:.1%} (mean over question families; "
            f"{metrics['count']} questions; {tokens})\n[vtc]   {families}\n"
            f"[vtc] trained in {metrics['train_seconds']:.0f} s; results in {run_dir_of(recipe) / 'metrics.json'}"
        )


def cmd_evaluate(args) -> int:
    from data.errors import UserError
    from data.templates import chosen_template
    from models.compressors import baselines as known_baselines
    from train.evaluate import Settings, evaluate

    known = list(known_baselines())
    baselines = known if args.baselines == "all" else [b for b in args.baselines.split(",") if b]
    unknown = [b for b in baselines if b not in known]
    if unknown:  # before any weights load
        raise UserError(
            f"--baselines: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    budgets = args.tokens
    settings = Settings(
        limit=args.limit,
        batch_size=args.batch_size,
        latency_batch=args.latency_batch,
        repeats=args.repeats,
        timing=not args.no_timing,
        device=args.device,
        dtype=args.dtype,
    )
    compare = [c for c in (args.compare or "").split(",") if c]
    report = evaluate(
        args.source,
        baselines,
        budgets,
        args.out,
        args.questions,
        args.images,
        settings,
        compare,
        args.uncompressed,
        args.setting or [],
        chosen_template(args.template, args.system_prompt, args.chat_template),
        args.baseline,
        args.fresh,
    )
    from train.evaluation.report import markdown

    print(markdown(report))
    return 0


def cmd_data_synth(args) -> int:
    from data.errors import UserError
    from data.shards import existing_shards, staged
    from data.synth import OBJECTS, crowd_problem, families_problem, write_synthetic

    objects = tuple(args.objects) if args.objects else OBJECTS
    if problem := families_problem(tuple(args.families)):
        raise UserError(f"--families {' '.join(args.families)}: {problem}")
    if problem := crowd_problem(objects, args.grid):
        raise UserError(f"--objects {objects[0]} {objects[1]}: {problem} (--grid {args.grid})")
    out = Path(args.out)
    old = existing_shards(out)
    if old and not args.overwrite:
        raise UserError(f"{out} already holds {len(old)} shard(s): choose another --out, or --overwrite")
    with staged(out, "overwrite" if old else "new") as tmp:  # never half a split in --out
        write_synthetic(
            tmp,
            args.split,
            args.samples,
            args.seed,
            args.image_size,
            args.grid,
            objects=objects,
            families=tuple(args.families),
        )
    print(f"wrote {args.samples} {args.split} samples to {args.out}")
    return 0


def cmd_data_convert(args) -> int:
    from data.convert import Selection, convert_llava_json
    from data.errors import UserError

    if args.overwrite and args.append:
        raise UserError("--overwrite and --append exclude each other")
    selection = Selection(args.single_turn, args.with_image, args.fraction, args.seed)
    mode = "overwrite" if args.overwrite else "append" if args.append else "new"
    report = convert_llava_json(
        args.json,
        args.images,
        args.out,
        args.samples_per_shard,
        selection=selection,
        mode=mode,
        allow_outside_images=args.allow_outside_images,
    )
    listed = Path(args.out) / "skipped.jsonl"
    print(
        report.summary()
        + (f"\nskipped entries, with their ids and reasons: {listed}" if report.skipped else "")
    )
    share = len(report.skipped) / max(report.total, 1)
    if report.skipped and share > args.max_skipped:
        kind, count = report.kinds()[0]
        print(
            f"vtc: error: {share:.0%} of the entries were skipped (more than --max-skipped "
            f"{args.max_skipped:g}); most of them ({count}) for the same reason: {kind}. "
            f"The first: {report.skipped[0]['reason']}",
            file=sys.stderr,
        )
        return 1
    return 0


def add_placement_options(parser, what: str) -> None:
    parser.add_argument(
        "--device", help=f"where {what} runs: cpu, cuda, cuda:1 ... (default: cuda when there is one)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help=f"precision of {what} (default auto: float16 on a GPU, LLaVA's own evaluation "
        "precision; float32 on a CPU)",
    )


def add_template_options(parser, what: str) -> None:
    parser.add_argument(
        "--template",
        choices=["vicuna_v1", "chat"],
        help=f"{what}: vicuna_v1 (LLaVA-1.5's) or chat (the tokenizer's own chat template, e.g. a "
        "Llama-3 LLaVA)",
    )
    parser.add_argument("--system-prompt", metavar="TEXT", help="with --template chat: its system prompt")
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="with --template chat: a Jinja file used instead of the tokenizer's chat template",
    )


def cmd_import(args) -> int:
    from data.templates import chosen_template
    from models.importer import import_llava
    from train.export import export_target
    from train.outputs import write_dir_atomic

    template = chosen_template(args.template, args.system_prompt, args.chat_template)
    notes = []

    def convert(folder):
        notes.extend(import_llava(args.source, folder, args.vision_tower, args.llavolta, template)[1])

    out = write_dir_atomic(export_target(args.out, args.source), convert)
    for note in notes:
        print(f"[vtc] {note}")
    print(
        f"[vtc] imported {args.source} → {out} (load it with models.export.load_pretrained, or vtc evaluate {out})"
    )
    return 0


def cmd_export(args) -> int:
    from train.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge_lora, compressor_only=args.compressor_only)
    print(f"exported to {out}; load it with models.export.load_pretrained({str(out)!r})")
    return 0


def cmd_ask(args) -> int:
    import json

    from data.errors import UserError
    from data.templates import chosen_template
    from train.ask import answers, check_questions, read_image
    from train.evaluation.sources import placed_model

    image = read_image(args.image)  # before any weights load
    questions = args.questions
    interactive = not questions and sys.stdin.isatty()
    if not questions and not interactive:  # piped: one question per line
        questions = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not questions:
            raise UserError("no question: give one after the image, or one per line on stdin")
    check_questions(questions)
    template = chosen_template(args.template, args.system_prompt, args.chat_template)
    built, _ = placed_model(
        args.source, args.compressor, args.tokens, args.device, args.dtype, template, args.setting or ()
    )
    counts = []  # (visual tokens into the LLM, a layer's on average) per answer

    def answer(batch: list[str]) -> None:
        many = len(batch) > args.batch_size  # a bar where there is more than one batch to wait for
        for row in answers(built, image, batch, args.max_new_tokens, args.batch_size, args.image, many):
            counts.append((row["visual_tokens"], row["visual_tokens_layer_mean"]))
            if args.json:
                print(json.dumps(row), flush=True)
            elif len(questions) > 1:
                print(f"Q: {row['question']}\nA: {row['answer']}", flush=True)
            else:
                print(row["answer"], flush=True)

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history at the prompt, where there is one)
        except ImportError:
            pass
        print("[vtc] one question per line; an empty line or Ctrl-D ends", file=sys.stderr)
        while line := read_question():
            answer([line])
    else:
        answer(questions)
    if counts:
        print(f"[vtc] {visual_tokens_line(counts)}", file=sys.stderr)
    return 0


def visual_tokens_line(counts: list[tuple[int, float]]) -> str:
    """What `vtc ask` says of the visual tokens its answers took: how many entered the LLM, and
    how many a layer saw on average where that is fewer (a component pruned inside the LLM)."""

    def spread(values, form) -> str:
        low, high = min(values), max(values)
        return form(low) if low == high else f"{form(low)}-{form(high)}"

    entered = [c for c, _ in counts]
    line = f"{spread(entered, str)} visual tokens of the image entered the LLM"
    if any(mean < c for c, mean in counts):
        line += f"; its layers saw {spread([m for _, m in counts], lambda m: f'{m:.1f}')} on average"
    return line


def read_question() -> str:
    """The next line typed at the `vtc ask` prompt; "" at an empty line or end of input."""
    try:
        return input("question> ").strip()
    except EOFError:
        print(file=sys.stderr)
        return ""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def token_budgets(text: str) -> list[int]:
    """`144,64,36` → [144, 64, 36]; every budget a positive whole number."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one budget, e.g. 144,64")
    return [positive_int(t) for t in parts]


def layer_and_stride(text: str) -> tuple[int, int]:
    """An argparse type: 'LAYER,STRIDE' (e.g. 2,8) → (2, 8)."""
    try:
        layer, stride = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER,STRIDE such as 2,8, got {text!r}") from None
    if stride < 1 or layer < -1:
        raise argparse.ArgumentTypeError(f"{text!r}: layer must be ≥ -1 and stride ≥ 1")
    return layer, stride


def memory_size(text: str) -> float:
    """An argparse type: '80GB' → bytes (train.plan.parse_memory)."""
    from train.plan import parse_memory

    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def number_in(allowed):
    """An argparse type: a number that `allowed` (a `train.schema.Range`, as recipes use) accepts."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def version_line() -> str:
    """`vtc 0.1.0 (torch ..., transformers ..., ...)`: what a bug report needs. Read from the
    installed packages' metadata, so `--help` and `--version` import none of them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    others = ", ".join(
        f"{name} {installed(name)}" for name in ("torch", "transformers", "lightning", "deepspeed", "peft")
    )
    return f"vtc {installed('vtc')} ({others})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtc",
        description="Train visual-token compressors for LLaVA-style models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)

    p = sub.add_parser("validate", help="parse and check a recipe (builds nothing heavy)")
    p.add_argument("recipe", help="recipe file or shipped name (e.g. tiny/base)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted-key overrides, e.g. stages.0.steps=10"
    )
    p.add_argument(
        "--anywhere",
        action="store_true",
        help="skip checks that depend on this machine (CUDA for DeepSpeed, data folders present)",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "plan",
        help="what a recipe costs, before it runs: parameters, batch, steps, memory per device, FLOPs, time",
        description="Plan a recipe without loading weights (the model is built on the meta device): "
        "per stage, parameters total and trainable by part, the global batch, the steps, the memory "
        "each device needs (model states for the recipe's strategy + activations, with and without "
        "gradient checkpointing), the training FLOPs and the wall time at a sustained throughput. "
        "Exits 1 when a stage does not fit --gpu-mem. The formulas are in train/plan.py.",
    )
    p.add_argument("recipe", help="recipe file or shipped name (e.g. llava-1.5-7b/tokenpacker/finetune)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.devices=16")
    p.add_argument(
        "--samples",
        type=number_in(Range(1)),
        help="training samples, for stages given in epochs (default: count the shard index)",
    )
    p.add_argument(
        "--tflops",
        type=number_in(Range(0, open_low=True)),
        default=400.0,
        help="sustained TFLOP/s per device, for the time estimate (default 400)",
    )
    p.add_argument(
        "--gpu-mem", type=memory_size, metavar="SIZE", help="warn when a stage needs more, e.g. 80GB"
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "train",
        help="train from a recipe (default: the main job, TokenPacker on the shipped tiny base)",
        description="Train from a recipe. The run goes to the recipe's `output` folder and synthetic "
        "data to `data.cache_dir` (default checkpoints/data); relative paths are from the working "
        "directory.",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        help="recipe file or shipped name; default recipes/tiny/tokenpacker.yaml (the main job)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. stages.0.steps=10 trainer.devices=2"
    )
    p.add_argument(
        "--resume",
        metavar="auto|CKPT",
        help="continue the run from its newest complete checkpoint (auto) or from RUN_DIR/ckpt/<one>",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even though the recipe, the shards the stage trains on or its base model changed in a way that matters",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the run (checkpoints, weights, logs, reports) and train it again from scratch",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a killed run from its newest checkpoint")
    p.add_argument("run_dir", help="the run directory (holds recipe.yaml and ckpt/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.log_every=1")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even though the recipe, the shards the stage trains on or its base model changed in a way that matters",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="write a trained run as a folder that loads back with one call")
    p.add_argument(
        "run_dir",
        help="a run directory (the recipe's output), or one of its step checkpoints "
        "(RUN_DIR/ckpt/stage<i>-<name>-step<N>: the model at that step)",
    )
    p.add_argument("out", help="folder to write")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the LLM weights (peft)")
    p.add_argument(
        "--compressor-only",
        action="store_true",
        help="write only the projector/compressor weights; the base is referenced by path",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="convert a checkpoint in the original LLaVA layout (LLaVA-1.5, TokenPacker, DyVTE) or FALCON's into a vtc export",
        description="Convert a checkpoint in the original LLaVA layout (config.json with mm_* keys; "
        "model.mm_projector.*, model.layers.*, model.vision_tower.* in *.safetensors or *.bin, the latter "
        "read with torch.load(weights_only=True)) into a vtc export: the LLaVA-1.5 MLP, TokenPacker's "
        "projector, DyVTE's routers; or a checkpoint of FALCON's released code (model_type jiutian): registers, "
        "crop embeddings, ReAtten, grids and crop indicators. See models/importer.py.",
    )
    p.add_argument("source", help="the checkpoint folder (config.json, weights, tokenizer files)")
    p.add_argument("out", help="the export folder to write")
    p.add_argument(
        "--vision-tower",
        metavar="DIR",
        help="local CLIP folder, when the checkpoint holds no tower weights (or its tower is not CLIP-L/336)",
    )
    p.add_argument(
        "--llavolta",
        type=layer_and_stride,
        metavar="LAYER,STRIDE",
        help="LLaVolta's inference setting, which its checkpoints do not record (heavy: 2,8; light: 16,8)",
    )
    add_template_options(
        p, "the prompt format it was tuned with, recorded for its evaluation (default vicuna_v1)"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "evaluate",
        help="accuracy kept vs. visual tokens vs. FLOPs vs. latency, with training-free baselines",
        description="Evaluate a trained run (or export, or llava-hf model) next to its uncompressed "
        "baseline and training-free baselines at each token budget; writes eval.json, eval.md, eval.png.",
    )
    p.add_argument(
        "source",
        help="a run directory or one of its step checkpoints (RUN_DIR/ckpt/...), a recipe (its run), "
        "a vtc export or a llava-hf folder",
    )
    p.add_argument(
        "--baseline",
        metavar="SOURCE",
        help="the row every other is measured against (default: the source's base, the LLaVA its "
        "compressor was attached to): another run, export or llava-hf folder (its model; the "
        "training-free baselines go on its base), or 'none' for no such row, the model then being "
        "the reference (e.g. an imported checkpoint whose base is no uncompressed model of it)",
    )
    p.add_argument(
        "--baselines",
        default="all",
        help="comma-separated training-free baselines, e.g. pooling,divprune ('' for none; default: "
        "all registered ones, which an unknown name lists)",
    )
    p.add_argument(
        "--tokens",
        type=token_budgets,
        help="visual-token budgets, e.g. 144,64,36 (default: 1/4 and 1/16 of the baseline's)",
    )
    p.add_argument(
        "--out",
        help="report folder (default: the source's folder; for a step checkpoint RUN/eval/<checkpoint>)",
    )
    p.add_argument("--questions", help="LLaVA question file (JSON lines: question_id, image, text[, answer])")
    p.add_argument("--images", help="folder the question file's image paths are relative to")
    p.add_argument(
        "--limit", type=positive_int, default=200, help="synthetic test images (each asked all its questions)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="questions per forward pass (default 64)"
    )
    p.add_argument("--latency-batch", type=positive_int, default=8, help="batch N of the latency figures")
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="timed repeats per figure (median reported)"
    )
    p.add_argument("--no-timing", action="store_true", help="accuracy, tokens and FLOPs only")
    add_placement_options(p, "every row")
    p.add_argument(
        "--compare",
        help="other runs or exports to measure beside it, comma-separated (e.g. the same recipe "
        "trained without compression)",
    )
    p.add_argument(
        "--uncompressed",
        action="store_true",
        help="also measure the trained model with its compressors left out (a run with compressors)",
    )
    p.add_argument(
        "--setting",
        action="append",
        metavar="COMPONENT.KEY=VALUE",
        help="also measure the model with a component's behaviour changed at test time (a key it may "
        "set per stage, e.g. falcon.reatten=false), compared with it question by question "
        "(exact McNemar p); repeatable",
    )
    add_template_options(p, "prompt every row so, not as the source records (a llava-hf folder records none)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="measure every row, even those an interrupted evaluation into the same folder measured "
        "(by default they are kept when the model files, questions and settings are unchanged)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "ask",
        help="a model answers questions about one image, as vtc evaluate asks them",
        description="Ask a trained run, a vtc export, a llava-hf folder or a shipped base about one\n"
        "image. Each question is a single-turn prompt in the model's template, answered by greedy\n"
        "decoding, as vtc evaluate asks its questions (no conversation history). Questions come\n"
        "after the image, or one per line on stdin; at a terminal with none given, it asks for them.",
        epilog="examples:\n"
        "  vtc ask checkpoints/tiny-tokenpacker image.png 'What colour is the circle?'\n"
        "  vtc ask tiny-llava image.png 'How many circles are there?' --compressor pooling --tokens 16\n"
        "  vtc ask EXPORT_DIR photo.jpg --json < questions.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source",
        help="a run directory or step checkpoint, a recipe, a vtc export, a llava-hf folder or shipped base",
    )
    p.add_argument("image", help="the image file (PNG, JPEG, ...)")
    p.add_argument(
        "questions", nargs="*", metavar="QUESTION", help="questions about it, each answered on its own"
    )
    p.add_argument(
        "--compressor",
        metavar="NAME",
        help="a training-free baseline put on the source's base (e.g. pooling, divprune; with --tokens)",
    )
    p.add_argument(
        "--tokens",
        type=positive_int,
        metavar="N",
        help="visual tokens to keep: with --compressor, or for a run whose trained pruner takes a budget",
    )
    p.add_argument(
        "--setting",
        action="append",
        metavar="COMPONENT.KEY=VALUE",
        help="a component's behaviour changed at test time (a key it may set per stage, e.g. "
        "falcon.reatten=false); repeatable",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=128, metavar="N", help="longest answer (default 128)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="questions per forward pass (default 8)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per answer: question, answer, visual_tokens (into the LLM), "
        "visual_tokens_layer_mean and visual_tokens_layers (in each decoder layer)",
    )
    add_placement_options(p, "the model")
    add_template_options(p, "prompt so, not as the source records (a llava-hf folder records none)")
    p.set_defaults(func=cmd_ask)

    data = sub.add_parser("data", help="make or convert training data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="write synthetic VQA shards")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--samples", type=positive_int, required=True, help="images to write")
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="train images are asked about every object, val/test one question per family; the "
        "splits never share a scene (default train)",
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed and split, the same images (default 0)")
    p.add_argument("--image-size", type=positive_int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--grid", type=positive_int, default=4, help="scene cells per side (default 4)")
    p.add_argument(
        "--objects",
        type=positive_int,
        nargs=2,
        default=None,
        metavar=("FEWEST", "MOST"),
        help="fewest and most shapes per scene (default: as a recipe's data.synthetic.objects)",
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=ASKED + EXTRA_FAMILIES,
        default=ASKED,
        metavar="FAMILY",
        help="the kinds of question each image is asked, as a recipe's data.synthetic.families "
        f"(default: {' '.join(ASKED)}; also: {' '.join(EXTRA_FAMILIES)})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser(
        "convert",
        help="convert LLaVA-format JSON + image folder into shards",
        description="Convert LLaVA-format samples into webdataset shards. Entries that cannot be "
        "used (malformed, missing or undecodable image, ...) are skipped and listed with their id "
        "and reason in OUT/skipped.jsonl; nothing is written to OUT until the conversion finishes.",
    )
    p.add_argument("json", help="LLaVA JSON file (a list of {id, image, conversations}) or JSON lines")
    p.add_argument("--images", required=True, help="folder the 'image' paths are relative to")
    p.add_argument("--out", required=True, help="folder for the shards and skipped.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    p.add_argument("--append", action="store_true", help="add shards after those already in --out")
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="read image paths that lead outside --images (absolute, ../); refused by default",
    )
    p.add_argument(
        "--max-skipped",
        type=number_in(Range(0, 1)),
        default=0.5,
        help="exit with status 1 when a larger share of the entries is skipped (default 0.5)",
    )
    p.add_argument(
        "--samples-per-shard", type=positive_int, default=2000, help="samples per .tar shard (default 2000)"
    )
    p.add_argument("--single-turn", action="store_true", help="only samples with one question and answer")
    p.add_argument("--with-image", action="store_true", help="only samples with an image")
    p.add_argument(
        "--fraction",
        type=number_in(Range(0, 1, open_low=True)),
        default=1.0,
        help="a random share of the selected samples, e.g. 0.01",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="of the --fraction draw (the same seed, the same samples)"
    )
    p.set_defaults(func=cmd_data_convert)
    return parser


# the commands that build, save or load models (transformers' save_pretrained goes through
# accelerate, which imports DeepSpeed)
MODEL_COMMANDS = ("train", "resume", "evaluate", "export", "import", "ask")


def tell_deepspeed_without_cuda() -> None:
    """On a machine without CUDA, set DS_ACCELERATOR=cpu before anything imports DeepSpeed: its
    own detection comes to the same answer, with a warning at every model save. A machine with
    CUDA, or a DS_ACCELERATOR the user set, is left alone."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """argparse gives `key=value` overrides (and `vtc ask`'s questions) to the positional list
    only before the first flag; `vtc train RECIPE --restart key=value` puts them after one, so
    those join the list too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra and hasattr(args, "questions") and not any(a.startswith("-") for a in extra):
        args.questions = [*args.questions, *extra]  # `vtc ask SOURCE IMAGE --json QUESTION`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


OUT_OF_MEMORY_HINTS = {
    "train": "lower the micro-batch (stages.N.batch_size; stages.N.global_batch_size keeps the "
    "optimizer's batch by accumulating), turn on trainer.gradient_checkpointing.llm=true, or shard "
    "the model states with trainer.strategy=deepspeed_stage_2 or _3; `vtc plan RECIPE --gpu-mem "
    "80GB` sizes a recipe before it runs",
    "evaluate": "lower --batch-size and --latency-batch, or evaluate in --dtype float16",
}
OUT_OF_MEMORY_HINTS["resume"] = OUT_OF_MEMORY_HINTS["train"]
OUT_OF_MEMORY_HINTS["ask"] = "lower --batch-size, or ask in --dtype float16"


# torch's two messages for a loader worker that died (a signal seen by its SIGCHLD handler, or a
# worker found dead), most often killed by the kernel for memory: the machine's state, not a bug
WORKER_DIED = "DataLoader worker (pid"
WORKER_DIED_HINT = (
    "a data loader worker died, most often killed by the kernel when memory ran out (or, as a "
    "Bus error, when shared memory did: /dev/shm in a container): lower data.num_workers (each "
    "worker holds decoded images), or give the job more memory; "
    "`vtc resume RUN_DIR` goes on from the newest checkpoint"
)


def out_of_gpu_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # an error from torch means torch is imported
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    from data.errors import UserError

    if args.command in MODEL_COMMANDS:
        tell_deepspeed_without_cuda()

    try:
        with stop_signals_exit():
            return args.func(args)
    except (UserError, FileNotFoundError) as err:  # anything else is a bug: keep its traceback
        print(f"vtc: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk is the machine's state, not a bug
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"vtc: error: no space left on the device{where}: free some, then run the command "
            "again (`vtc resume RUN` goes on with a run)",
            file=sys.stderr,
        )
        return 2
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        hint = OUT_OF_MEMORY_HINTS.get(args.command)
        if hint is not None and out_of_gpu_memory(err):
            print(f"vtc: error: out of GPU memory ({str(err).splitlines()[0]})\n  {hint}", file=sys.stderr)
        elif str(err).startswith(WORKER_DIED):
            print(f"vtc: error: {str(err).splitlines()[0]}\n  {WORKER_DIED_HINT}", file=sys.stderr)
        else:
            raise
        return 2
    except KeyboardInterrupt:  # Ctrl-C is no bug: no traceback (training says how to resume)
        print("vtc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
