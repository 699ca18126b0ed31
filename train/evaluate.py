"""`vtc evaluate`: accuracy kept vs. visual tokens vs. FLOPs vs. measured speed.

Every method runs through the same harness — same questions, template, preprocessing and greedy
decoding — always next to the uncompressed baseline (the LLaVA model the compressor was attached
to). Training-free baselines are registered components added to that baseline at each token
budget. Per method and budget the report has: accuracy (mean over question families, and per
family), accuracy kept vs. the baseline, visual tokens into the LLM (mean) and per layer,
analytic prefill FLOPs (models/flops.py), measured prefill latency at batch 1 and batch N and
decode tokens/s (medians of repeats), and peak memory of a batch-N prefill.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from data.dataset import collate
from data.errors import UserError
from models.build import Built, ComponentSpec, build
from models.compressors import baselines as registered_baselines
from models.compressors import component_class
from models.flops import module_flops, prefill_flops
from train.accuracy import (
    QuestionSet,
    _prompt_item,
    agreement,
    answer_prior,
    answer_questions,
    file_questions,
    mean_prior,
    score,
    synthetic_questions,
)


@dataclass
class Settings:
    limit: int | None = 200  # synthetic test images (each asked all its questions)
    batch_size: int = 64  # accuracy pass
    max_new_tokens: int = 8  # a grounded answer: up to 5 cells, " . ", the answer, </s>
    latency_batch: int = 8  # "batch N" of the latency figures
    decode_tokens: int = 16
    repeats: int = 5
    timing: bool = True


@dataclass
class Method:
    label: str  # e.g. "baseline", "model", "fastv"
    budget: int | None  # visual tokens asked for (None: the method's own)
    make: Callable[[], Built]


@dataclass
class Source:
    """What `vtc evaluate` was pointed at: the model under test (None when it is the baseline
    itself), the baseline's llava-hf folder, and where the report goes by default."""

    model: Callable[[], Built] | None
    base_dir: str
    out_dir: Path
    data: object  # a DataRecipe for the synthetic test split
    description: str
    # the model under test set to keep a token budget (its trained compressors' budget_params),
    # or None when its token count is fixed
    model_at: Callable[[int, int, object], Callable[[], Built] | None] | None = None
    # the model under test with its compressors left out (a run with compressors), else None
    uncompressed: Callable[[], Built] | None = None


def _names_a_recipe(target: str) -> bool:
    from train.recipe import resolve_recipe_path

    try:
        resolve_recipe_path(target)
    except FileNotFoundError:
        return False
    return True


def resolve_source(target: str) -> Source:
    """A run directory, a recipe (its run), a `vtc export` folder or a llava-hf folder."""
    from train.recipe import DataRecipe, load_recipe, resolve_base
    from train.run import is_run_dir, run_dir_of

    path = Path(target)
    if not path.is_dir():
        if not _names_a_recipe(target):
            raise FileNotFoundError(
                f"{target}: no such run directory, vtc export or llava-hf folder (nor a recipe file "
                "or shipped recipe name)"
            )
        recipe = load_recipe(target, check_machine=False)
        path = run_dir_of(recipe)
        if not (path / "trainable.safetensors").is_file():
            raise FileNotFoundError(f"{target}: its run {path} is not trained yet (vtc train {target})")
    if is_run_dir(path):
        from train.export import at_budget, rebuild_run

        recipe = load_recipe(path / "recipe.yaml", check_machine=False)
        own_base = path / "hf"
        if (own_base / "config.json").is_file():  # the run is itself a LLaVA base (e.g. tiny-base)
            return Source(None, str(own_base), path, recipe.data, f"run {path} (its llava-hf model)")
        base = resolve_base(recipe.model.base)
        if not (Path(base) / "config.json").is_file():
            raise UserError(
                f"{path}: its base {recipe.model.base!r} is not a trained LLaVA to compare against"
            )

        def model_at(budget: int, visual: int, dims) -> Callable[[], Built] | None:
            compressors = at_budget(recipe.model.compressors, budget, visual, dims)
            return None if compressors is None else (lambda: rebuild_run(path, compressors)[0])

        uncompressed = (lambda: rebuild_run(path, [])[0]) if recipe.model.compressors else None
        return Source(
            lambda: rebuild_run(path)[0], base, path, recipe.data, f"run {path}", model_at, uncompressed
        )
    meta_path = path / "vtc.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format") == "vtc-export-1":
        from models.export import load_pretrained

        plain = meta["projector"]["name"] == "mlp2x_gelu" and not meta["compressors"] and not meta.get("lora")
        base = meta["base"] or str(path)  # an export's llava-hf part holds the base weights
        model = None if plain else (lambda: load_pretrained(path))
        return Source(model, base, path, DataRecipe(), f"export {path}")
    if (path / "config.json").is_file():
        return Source(None, str(path), path, DataRecipe(), f"llava-hf model {path}")
    raise FileNotFoundError(f"{target}: not a run directory, recipe, vtc export or llava-hf folder")


def methods_for(
    source: Source,
    baselines: list[str],
    budgets: list[int],
    dims,
    visual: int,
    reference: Built | None = None,
    compare: list[str] = (),
    uncompressed: bool = False,
) -> list[Method]:
    """The rows to measure; `reference` is the baseline model if it is already built; `compare`:
    other runs or exports measured beside it (labelled by their folder names); `uncompressed`:
    the model under test also with its compressors left out."""
    methods = [
        Method("baseline", None, (lambda: reference) if reference else (lambda: build(source.base_dir)))
    ]
    if source.model is not None:
        methods.append(Method("model", None, source.model))
        for budget in budgets if source.model_at is not None else ():
            make = source.model_at(budget, visual, dims)
            if make is not None:  # a trained pruner evaluated at every budget
                methods.append(Method("model", budget, make))
    if uncompressed:
        if source.uncompressed is None:
            raise UserError("--uncompressed needs a run whose recipe has compressors")
        methods.append(Method("model-uncompressed", None, source.uncompressed))
    for other in compare:
        found = resolve_source(other)
        make = found.model or (lambda found=found: build(found.base_dir))
        methods.append(Method(Path(other).name or other, None, make))
    known = registered_baselines()
    for label in baselines:
        if label not in known:
            raise UserError(f"--baselines: unknown {label!r}; choose from {', '.join(known)}")
        name = known[label]
        for budget in budgets:
            params = component_class(name).budget_params(budget, visual, dims)
            if params is None:
                print(f"[vtc] {label}: cannot keep exactly {budget} of {visual} tokens; left out")
                continue
            spec = ComponentSpec(name, params)
            methods.append(
                Method(label, budget, lambda spec=spec: build(source.base_dir, compressors=[spec]))
            )
    return methods


# ------------------------------------------------------------------------------ measuring


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (CPU memory tracker: weights
    and other tensors made before entering are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(tensor, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def prompt_batch(built: Built, questions: QuestionSet, size: int, count: int) -> dict:
    """The first `count` questions as one padded batch (the latency workload)."""
    from data.dataset import load_views
    from data.templates import get_template

    tmpl = get_template("vicuna_v1")
    model, items = built.model, []
    for q in questions.questions[:count]:
        views = load_views(questions.read_image(q.image), size, model.view_grids)
        prompt = tmpl.prompt("<image>\n" + q.text, built.tokenizer, model.image_token_id)
        items.append(_prompt_item(q, prompt, views))
    return collate(items, built.tokenizer.pad_token_id)


def layer_tokens(built: Built, batch: dict) -> tuple[list[int], int]:
    """Sequence length entering each decoder layer during the prefill of a 1-sample batch, and the
    number of visual tokens that entered the LLM."""
    seen: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True,
        )
        for layer in built.model.llm.body.layers
    ]
    try:
        _, visual = generate(built, batch, 1)
    finally:
        for hook in hooks:
            hook.remove()
    return seen[: len(built.model.llm.body.layers)], int(visual[0])


def text_tokens(model, batch: dict) -> int:
    """Text tokens of a 1-sample batch (its real tokens but the <image> placeholders)."""
    ids = batch["input_ids"][batch["attention_mask"].bool()]
    return int((ids != model.image_token_id).sum())


def generate(built: Built, batch: dict, new_tokens: int):
    with torch.no_grad():
        return built.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=new_tokens,
            eos_token_id=None,  # decode exactly `new_tokens`
            image_grids=batch.get("image_grids"),
        )


def cost(built: Built, questions: QuestionSet, size: int, settings: Settings) -> dict:
    """FLOPs, per-layer tokens, latency, decode speed and peak memory of one method."""
    model = built.model.eval()
    one = prompt_batch(built, questions, size, 1)
    per_layer, visual = layer_tokens(built, one)
    text = text_tokens(model, one)  # not per_layer[0] - visual: a pruner may act before layer 0
    images = one["pixel_values"].shape[0]
    with torch.no_grad():
        features = model.vision(one["pixel_values"][:1])
        projector = module_flops(model.projector, features)
    flops = prefill_flops(built.hf.config, text, visual, per_layer, projector, images=images)
    row = {
        "layer_tokens": per_layer,
        "visual_tokens_layer_mean": sum(per_layer) / len(per_layer) - text,
        "flops": flops.as_dict(),
    }
    if not settings.timing:
        return row
    batch = prompt_batch(built, questions, size, settings.latency_batch)
    for name, inputs in (("batch1", one), ("batchN", batch)):
        prefill = timed(lambda inputs=inputs: generate(built, inputs, 1), settings.repeats)
        full = timed(
            lambda inputs=inputs: generate(built, inputs, 1 + settings.decode_tokens), settings.repeats
        )
        row[f"prefill_ms_{name}"] = 1000 * prefill
        # decode = the tokens after the first, at the batch's width
        row[f"decode_tokens_per_s_{name}"] = (
            inputs["input_ids"].shape[0] * settings.decode_tokens / max(full - prefill, 1e-9)
        )
    row["batch_n"] = batch["input_ids"].shape[0]
    row.update(peak_memory(built, batch))
    return row


def peak_memory(built: Built, batch: dict) -> dict:
    if torch.cuda.is_available() and next(built.model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        generate(built, batch, 1)
        peak = torch.cuda.max_memory_allocated() - before
        return {
            "peak_memory_mb": peak / 2**20,
            "memory_measure": "cuda max_memory_allocated (prefill, batch N)",
        }
    with LiveTensorBytes() as tracker:
        generate(built, batch, 1)
    return {
        "peak_memory_mb": tracker.peak / 2**20,
        "memory_measure": "live tensors made by the prefill (CPU)",
    }


# ------------------------------------------------------------------------------- the run


def evaluate(
    target: str,
    baselines: list[str],
    budgets: list[int] | None = None,
    out_dir: str | Path | None = None,
    questions_file: str | None = None,
    images_dir: str | None = None,
    settings: Settings | None = None,
    compare: list[str] = (),
    uncompressed: bool = False,
) -> dict:
    """Evaluate `target` and the baselines (and the `compare` sources, and `target` without its
    compressors); write eval.json, eval.md, eval.png to `out_dir` (default: the target's folder)
    and return the report."""
    from train.datamodule import split_shards

    settings = settings or Settings()
    source = resolve_source(target)
    out = Path(out_dir) if out_dir else source.out_dir
    reference = build(source.base_dir)
    dims, visual = reference.model.dims, reference.model.visual_tokens()
    size = reference.hf.config.vision_config.image_size
    budgets = budgets or [visual // 4, visual // 16]
    if questions_file:
        if not images_dir:
            raise UserError("--questions needs --images (the folder its image paths are relative to)")
        questions = file_questions(questions_file, images_dir)
    else:
        questions = synthetic_questions(split_shards(source.data, "test"), settings.limit)
    methods = methods_for(source, baselines, budgets, dims, visual, reference, compare, uncompressed)
    rows, reference_answers = [], None
    for method in tqdm(methods, desc="methods", unit="method"):
        built = method.make()
        for component in built.model.components():
            component.reset_statistics()
        answers = answer_questions(
            built.model,
            built.tokenizer,
            questions,
            size,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            desc=f"{method.label}{'' if method.budget is None else f' @{method.budget}'}",
        )
        row = {"method": method.label, "budget": method.budget, **score(questions, answers)}
        reference_answers = reference_answers or answers  # the first row is the baseline
        row["agreement"] = agreement(questions, answers, reference_answers)
        counted = {c.registry_name: c.statistics() for c in built.model.components() if c.statistics()}
        if counted:  # e.g. where a dynamic method exited, over the questions just answered
            row["statistics"] = counted
        row.update(cost(built, questions, size, settings))
        rows.append(row)
        if questions_file:
            write_answers(
                out / f"answers-{method.label}{'' if method.budget is None else f'-{method.budget}'}.jsonl",
                questions,
                answers,
                method.label,
            )
    add_relative(rows)
    report = {
        "source": source.description,
        "questions": questions.name,
        "question_count": len(questions.questions),
        "settings": settings.__dict__,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "rows": rows,
        "answer_prior": answer_prior(questions),
    }
    write_report(report, out)
    return report


def add_relative(rows: list[dict]) -> None:
    """Accuracy kept, analytic speed-up ceiling and measured speed-ups vs. the baseline row."""
    base = rows[0]
    for row in rows:
        row["accuracy_kept"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        row["speedup_analytic"] = base["flops"]["total"] / row["flops"]["total"]
        for key in ("prefill_ms_batch1", "prefill_ms_batchN"):
            if key in row:
                row[f"speedup_{key[len('prefill_ms_') :]}"] = base[key] / row[key]


def write_answers(path: Path, questions: QuestionSet, answers: dict, label: str) -> None:
    """Answers in the layout of LLaVA's model_vqa output (one JSON object per line)."""
    from train.outputs import write_text_atomic

    lines = []
    for q in questions.questions:
        got = answers.get(q.id, {})
        entry = {"question_id": q.id, "prompt": q.text, "text": got.get("text"), "model_id": label}
        if "skipped" in got:
            entry["skipped"] = got["skipped"]
        lines.append(json.dumps(entry))
    write_text_atomic(path, "\n".join(lines) + "\n")


def summary(report: dict) -> str:
    """A compact table for the terminal: accuracy, kept, per family and measured speed-up."""
    rows = report["rows"]
    families = sorted({f for r in rows for f in r["per_family"]})
    timing = "speedup_batchN" in rows[0]
    head = f"{'method':<12}{'tokens':>7}{'acc':>8}{'kept':>8}{'same':>7}" + "".join(
        f"{f[:7]:>8}" for f in families
    )
    lines = [head + (f"{'prefill ×':>11}" if timing else "")]
    for r in rows:
        label = r["method"] + ("" if r["budget"] is None else f"@{r['budget']}")
        kept = "-" if r["accuracy_kept"] is None else f"{r['accuracy_kept']:.1%}"
        same = "-" if r.get("agreement") is None else f"{r['agreement']:.0%}"
        line = f"{label:<12}{r['visual_tokens_layer_mean']:>7.1f}{r['accuracy']:>8.1%}{kept:>8}{same:>7}"
        line += "".join(f"{r['per_family'].get(f, float('nan')):>8.1%}" for f in families)
        lines.append(line + (f"{r['speedup_batchN']:>10.2f}×" if timing else ""))
    prior = report.get("answer_prior")
    if prior:
        mean = mean_prior(prior)
        lines.append(
            f"{'prior':<12}{'':>7}{mean:>8.1%}{'':>8}{'':>7}"
            + "".join(f"{prior.get(f, 0):>8.1%}" for f in families)
        )
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    from train.outputs import write_atomic, write_json_atomic, write_text_atomic

    write_json_atomic(out / "eval.json", report)
    write_text_atomic(out / "eval.md", markdown(report))
    write_atomic(out / "eval.png", lambda tmp: plot(report, tmp))


def markdown(report: dict) -> str:
    rows = report["rows"]
    families = sorted({f for r in rows for f in r["per_family"]})
    timing = "prefill_ms_batch1" in rows[0]
    head = [
        "method",
        "budget",
        "visual tokens",
        "accuracy",
        "kept",
        "same answers",
        *families,
        "GFLOPs",
        "ceiling ×",
    ]
    if timing:
        head += ["b1 ms", "b1 ×", "bN ms", "bN ×", "decode tok/s b1", "decode tok/s bN", "peak MB"]
    lines = [
        f"# vtc evaluate — {report['source']}",
        "",
        f"{report['question_count']} questions ({report['questions']}); "
        f"{report['machine']['device']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}. "
        "Accuracy = mean over question families; kept = vs. the baseline; same answers = share of "
        "answers identical to the baseline's; GFLOPs = analytic prefill "
        "(models/flops.py); ceiling × = the speed-up those FLOPs allow; × = measured prefill speed-up.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["method"],
            "-" if r["budget"] is None else str(r["budget"]),
            f"{r['visual_tokens']:.1f} (layer mean {r['visual_tokens_layer_mean']:.1f})",
            f"{r['accuracy']:.1%}",
            "-" if r["accuracy_kept"] is None else f"{r['accuracy_kept']:.1%}",
            "-" if r.get("agreement") is None else f"{r['agreement']:.1%}",
            *[f"{r['per_family'].get(f, float('nan')):.1%}" for f in families],
            f"{r['flops']['total'] / 1e9:.3f}",
            f"{r['speedup_analytic']:.2f}",
        ]
        if timing:
            cells += [
                f"{r['prefill_ms_batch1']:.1f}",
                f"{r['speedup_batch1']:.2f}",
                f"{r['prefill_ms_batchN']:.1f}",
                f"{r['speedup_batchN']:.2f}",
                f"{r['decode_tokens_per_s_batch1']:.0f}",
                f"{r['decode_tokens_per_s_batchN']:.0f}",
                f"{r['peak_memory_mb']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    prior = report.get("answer_prior")
    if prior:
        mean = mean_prior(prior)
        cells = [
            "answer prior",
            "-",
            "-",
            f"{mean:.1%}",
            "-",
            "-",
            *[f"{prior.get(f, float('nan')):.1%}" for f in families],
        ]
        lines.append("| " + " | ".join(cells + ["-"] * (len(head) - len(cells))) + " |")
    if timing:
        lines += ["", f"Batch N = {rows[0]['batch_n']}. Peak memory: {rows[0]['memory_measure']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy vs. visual tokens and vs. prefill FLOPs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: dict[str, list[dict]] = {}
    for row in report["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows = sorted(rows, key=lambda r: r["flops"]["total"])
        style = {"marker": "*", "markersize": 12} if method in ("baseline", "model") else {"marker": "o"}
        accuracy = [100 * r["accuracy"] for r in rows]
        axes[0].plot([r["visual_tokens_layer_mean"] for r in rows], accuracy, label=method, **style)
        axes[1].plot([r["flops"]["total"] / 1e9 for r in rows], accuracy, label=method, **style)
    prior = report.get("answer_prior")
    if prior:  # the accuracy of always giving each family's most common answer: chance level
        chance = 100 * mean_prior(prior)
        for ax in axes:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                "answer prior (mean over families)",
                (0.01, chance),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
    axes[0].set_xlabel("visual tokens (mean over LLM layers)")
    axes[1].set_xlabel("prefill GFLOPs (analytic)")
    for ax in axes:
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(report["source"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
