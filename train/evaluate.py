"""`vtc evaluate`: accuracy kept vs. visual tokens vs. FLOPs vs. measured speed.

Every method runs through the same harness — same questions, template, preprocessing and greedy
decoding — next to the uncompressed baseline (the LLaVA model the compressor was attached to;
`--baseline` names another, or none). Training-free baselines are registered components added
to that baseline's base at each token budget. Per method and budget the report has: accuracy
(mean over question families, and per family), accuracy kept vs. the baseline, the share of
answers the same as the baseline's, the share right on the hard subset (the questions the
down-sampled image gets wrong), visual tokens into the LLM (mean) and per layer, analytic
prefill FLOPs (models/flops.py), measured prefill latency at batch 1 and batch N and decode
tokens/s (medians of repeats), and peak memory of a batch-N prefill.


The work is split by job: `train/evaluation/sources.py` (what is measured),
`train/evaluation/measure.py` (cost, latency, memory), `train/evaluation/report.py` (tables
and plot); this module runs them in order.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from data.errors import UserError
from data.templates import Template
from models.build import to_precision
from train.accuracy import (
    agreement,
    answer_prior,
    answer_questions,
    file_questions,
    paired,
    right_answers,
    score,
    synthetic_questions,
)
from train.evaluation.measure import Settings, cost
from train.evaluation.report import add_hard_subsets, add_relative, write_answers, write_report
from train.evaluation.saved_rows import SavedRows, file_stamps, model_files, questions_digest
from train.evaluation.sources import (
    NO_BASELINE,
    SettingAtTest,
    baseline_row,
    methods_for,
    resolve_source,
)


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
    test_settings: list[str] = (),
    template: Template | None = None,
    baseline: str | None = None,
    fresh: bool = False,
) -> dict:
    """Evaluate `target` and the baselines (and the `compare` sources, `target` without its
    compressors, and `target` with each of `test_settings`, "NAME.KEY=VALUE", compared with it
    question by question); write eval.json, eval.md, eval.png to `out_dir` (default: the
    target's folder) and return the report. `template`: prompt every row so instead of in the
    template the source records (e.g. a llava-hf folder of a chat LLaVA, which records none).
    `baseline`: the row every other is measured against: by default the target's base; another
    source (its model, as this function measures it; the training-free baselines then go on
    its base); or NO_BASELINE, no such row (the first row, the model, is the reference).
    Rows an interrupted evaluation into the same folder measured are kept (`SavedRows`) unless
    `fresh`."""
    from train.datamodule import split_shards

    settings = (settings or Settings()).resolved()
    device, _ = settings.placement()  # before any weights load
    changed = [SettingAtTest.parse(text) for text in test_settings]
    # a run on a base built from configs (untrained) is measured only where nothing needs its base
    base_used = baseline is None or (baseline == NO_BASELINE and bool(baselines))
    source = resolve_source(target, settings.dtype, base_used)
    if template is not None:
        source.template = template
    against, make_baseline = baseline_row(source, baseline)
    out = Path(out_dir) if out_dir else source.out_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder for the report")
    try:  # before any row is measured: e.g. the default, a read-only model folder
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UserError(f"{out}: cannot write the report there ({err.strerror}); give --out DIR") from None
    dims, visual, size = source.shape
    budgets = budgets or [visual // 4, visual // 16]
    if questions_file:
        if not images_dir:
            raise UserError("--questions needs --images (the folder its image paths are relative to)")
        questions = file_questions(questions_file, images_dir)
    else:
        shards = source.data.test_shards
        if shards and not Path(shards).exists():  # e.g. an export measured on another machine
            raise UserError(
                f"{source.description} is measured on its run's test shards, {shards}, which are not "
                "there: put them back, or give a question file (--questions FILE --images DIR)"
            )
        questions = synthetic_questions(split_shards(source.data, "test"), settings.limit)
    for setting in changed:
        setting.check(dims)
    methods = methods_for(source, baselines, budgets, make_baseline, compare, uncompressed, changed, against)
    identity = evaluation_identity(source, against, baseline, compare, questions, settings)
    with SavedRows(out, identity, fresh) as saved:
        answers_dir = out if questions_file else None  # LLaVA-style answer files beside the report
        rows, right = measured_rows(methods, saved, questions, size, source.template, settings, answers_dir)
        add_relative(rows)
        add_hard_subsets(rows, right)
        if changed:
            add_vs_model(rows, right)
        report = {
            "source": source.description,
            "baseline": "none" if make_baseline is None else against.description,
            "template": source.template.to_dict(),
            "questions": questions.name,
            "question_count": len(questions.questions),
            "settings": settings.__dict__,
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": str(device),
            },
            "rows": rows,
            "answer_prior": answer_prior(questions),
        }
        write_report(report, out)
    return report


def measured_rows(
    methods, saved: SavedRows, questions, size: int, template: Template, settings: Settings, answers_dir
) -> tuple[list[dict], list[dict[str, bool]]]:
    """(a row per method, {question id: answered right} per method): each method measured, or
    taken from `saved` where an interrupted evaluation measured it, and saved as soon as measured;
    with `answers_dir`, each method's answers written there as a LLaVA answer file."""
    keys = method_keys(methods)
    earlier = saved.earlier(keys)
    rows, right, reference_answers = [], [], None
    for method, key, measured in tqdm(
        zip(methods, keys, earlier, strict=True), total=len(methods), desc="methods", unit="method"
    ):
        if measured is None:
            measured = measure(method, questions, size, template, settings, saved.partial(key))
            saved.put(key, *measured)
        row, answers = dict(measured[0]), measured[1]
        reference_answers = reference_answers or answers  # the first row: the baseline, or the model
        row["agreement"] = agreement(questions, answers, reference_answers)
        right.append(right_answers(questions, answers))
        rows.append(row)
        if answers_dir is not None:
            suffix = "" if method.budget is None else f"-{method.budget}"
            name = method.label.replace("/", "-")  # a --compare label may name folders above its own
            write_answers(answers_dir / f"answers-{name}{suffix}.jsonl", questions, answers, method.label)
    return rows, right


def add_vs_model(rows: list[dict], right: list[dict[str, bool]]) -> None:
    """Each test-time setting's row (`model[NAME.KEY=VALUE]`) against the model as trained,
    question by question (exact McNemar p)."""
    model = right[[r["method"] for r in rows].index("model")]
    for row, judged in zip(rows, right, strict=True):
        if row["method"].startswith("model["):
            pair = paired(model, judged)
            row["vs_model"] = {
                "questions": pair["questions"],
                "right_by_model_only": pair["only_a"],
                "right_by_this_only": pair["only_b"],
                "p": pair["p"],
            }


def measure(method, questions, size: int, template: Template, settings: Settings, partial=None):
    """(row, answers) of one method: its accuracy, tokens and component statistics over
    `questions`, and its cost; one model in memory at a time. `partial` (a PartialRow): where
    the answers are recorded as they come, with the components' counts, and those a stopped
    measurement recorded taken back, unless a component cannot save its counts."""
    device, dtype = settings.placement()
    built = method.make()
    to_precision(built.model, dtype, device)  # LoRA and components too; buffers kept
    built.template = template  # every row prompted as the model under test was tuned
    components = built.model.components()
    for component in components:
        component.reset_statistics()
    if any(c.statistics_state() is None for c in components):
        partial = None  # its counts would cover only the questions answered after the stop
    known, counts = partial.answered() if partial is not None else ({}, [])
    for component, state in zip(components, counts, strict=True) if known else ():
        component.load_statistics_state(state)  # the counts over the `known` answers
    if partial is not None:
        partial.start(known, counts)
    if known:
        print(
            f"[vtc] {method.label}: {len(known)} of {len(questions.questions)} questions were answered before; kept"
        )

    def record(batch: dict[str, dict]) -> None:
        partial.record(batch, [c.statistics_state() for c in components])

    answers = answer_questions(
        built.model,
        built.tokenizer,
        questions,
        size,
        built.template,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        desc=f"{method.label}{'' if method.budget is None else f' @{method.budget}'}",
        known=known,
        on_answers=None if partial is None else record,
    )
    row = {"method": method.label, "budget": method.budget, **score(questions, answers)}
    if method.training:
        row["training"] = method.training
    counted = {c.registry_name: c.statistics() for c in components if c.statistics()}
    if counted:  # e.g. where a dynamic method exited, over every question
        row["statistics"] = counted
    row.update(cost(built, questions, size, settings, answers))
    return row, answers


def method_keys(methods) -> list[tuple[str, int | None, int]]:
    """(label, budget, how many rows before it have both): what a saved row is looked up by."""
    seen: dict[tuple, int] = {}
    keys = []
    for method in methods:
        pair = (method.label, method.budget)
        keys.append((*pair, seen.get(pair, 0)))
        seen[pair] = seen.get(pair, 0) + 1
    return keys


def evaluation_identity(source, against, baseline, compare, questions, settings: Settings) -> dict:
    """Everything besides a row's method that decides what it measures (see SavedRows)."""
    roots = [source.location, source.base_dir, against.location, against.base_dir, *compare]
    return {
        "model_files": file_stamps(model_files([r for r in roots if r])),
        "sources": [source.description, against.description, baseline],
        "template": source.template.to_dict(),
        "questions": questions_digest(questions),
        "settings": settings.__dict__,
    }
