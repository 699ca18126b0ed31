"""How `vtc evaluate` reports: the relative columns, eval.json, eval.md, eval.png, the
terminal table and LLaVA-style answer files."""

from __future__ import annotations

import json
from pathlib import Path

from train.accuracy import QuestionSet, mean_prior


def add_relative(rows: list[dict]) -> None:
    """Accuracy kept, analytic speed-up ceiling and measured speed-ups vs. the first row: the
    baseline, or the model under test where there is none (`--baseline none`)."""
    base = rows[0]
    for row in rows:
        row["accuracy_kept"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        row["speedup_analytic"] = base["flops"]["total"] / row["flops"]["total"]
        for key in ("prefill_ms_batch1", "prefill_ms_batchN"):
            if key in row:
                row[f"speedup_{key[len('prefill_ms_') :]}"] = base[key] / row[key]


HARD_SUBSET_METHOD = "downsample"


def add_hard_subsets(rows: list[dict], right: list[dict[str, bool]]) -> None:
    """The hard subset at budget b: the questions the down-sampled image at b tokens answers
    wrong — where compression methods actually differ, since what a lower resolution keeps every
    method keeps. `right[i]` = {question id: answered right} of rows[i]. Adds
    row["hard"][str(b)] = {"questions", "accuracy" (share answered right)} to the rows at budget b
    and to the rows without a budget (baseline, model: the ceiling on that subset)."""
    subsets = {
        row["budget"]: {qid for qid, ok in judged.items() if not ok}
        for row, judged in zip(rows, right, strict=True)
        if row["method"] == HARD_SUBSET_METHOD
    }
    for row, judged in zip(rows, right, strict=True):
        hard = {}
        for budget, subset in subsets.items():
            if row["budget"] not in (None, budget):
                continue
            ids = [qid for qid in subset if qid in judged]
            share = sum(judged[qid] for qid in ids) / len(ids) if ids else None
            hard[str(budget)] = {"questions": len(ids), "accuracy": share}
        if hard:
            row["hard"] = hard


def hard_budgets(rows: list[dict]) -> list[str]:
    """The budgets with a hard subset, largest first."""
    return sorted({b for r in rows for b in r.get("hard", {})}, key=int, reverse=True)


def _hard_cell(row: dict, budget: str) -> str:
    entry = row.get("hard", {}).get(budget)
    return "-" if entry is None or entry["accuracy"] is None else f"{entry['accuracy']:.0%}"


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
    hard = hard_budgets(rows)
    head = f"{'method':<12}{'tokens':>7}{'acc':>8}{'kept':>8}{'same':>7}" + "".join(
        f"{f[:7]:>8}" for f in families
    )
    head += "".join(f"{'hard@' + b:>9}" for b in hard)
    lines = [head + (f"{'prefill ×':>11}" if timing else "")]
    for r in rows:
        label = r["method"] + ("" if r["budget"] is None else f"@{r['budget']}")
        kept = "-" if r["accuracy_kept"] is None else f"{r['accuracy_kept']:.1%}"
        same = "-" if r.get("agreement") is None else f"{r['agreement']:.0%}"
        line = f"{label:<12}{r['visual_tokens_layer_mean']:>7.1f}{r['accuracy']:>8.1%}{kept:>8}{same:>7}"
        line += "".join(f"{r['per_family'].get(f, float('nan')):>8.1%}" for f in families)
        line += "".join(f"{_hard_cell(r, b):>9}" for b in hard)
        lines.append(line + (f"{r['speedup_batchN']:>10.2f}×" if timing else ""))
    prior = report.get("answer_prior")
    if prior:
        mean = mean_prior(prior)
        lines.append(
            f"{'prior':<12}{'':>7}{mean:>8.1%}{'':>8}{'':>7}"
            + "".join(f"{prior.get(f, 0):>8.1%}" for f in families)
        )
    for r in rows:
        for stage in r.get("training", ()):
            lines.append(f"{r['method']} trained: {_stage_text(stage)}")
    for r in rows:
        if "vs_model" in r:
            pair = r["vs_model"]
            lines.append(
                f"{r['method']}: right by the model only {pair['right_by_model_only']}, by this only "
                f"{pair['right_by_this_only']} (exact McNemar p {pair['p']:.3g})"
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
    hard = hard_budgets(rows)
    hard_sizes = {b: next(r["hard"][b]["questions"] for r in rows if b in r.get("hard", {})) for b in hard}
    reference = (
        "the baseline" if rows[0]["method"] == "baseline" else f"`{rows[0]['method']}` (no baseline row)"
    )
    head = [
        "method",
        "budget",
        "visual tokens",
        "accuracy",
        "kept",
        "same answers",
        *families,
        *[f"hard @{b} ({hard_sizes[b]} q)" for b in hard],
        "GFLOPs",
        "ceiling ×",
    ]
    if timing:
        head += ["b1 ms", "b1 ×", "bN ms", "bN ×", "decode tok/s b1", "decode tok/s bN", "peak MB"]
    lines = [
        f"# vtc evaluate — {report['source']}",
        "",
        f"{report['question_count']} questions ({report['questions']}), prompted in the "
        f"`{report.get('template', {}).get('name', 'vicuna_v1')}` template; "
        f"{report['machine']['device']} in {report.get('settings', {}).get('dtype', 'float32')}, "
        f"{report['machine']['threads']} threads, torch {report['machine']['torch']}. "
        + (f"Baseline: {report['baseline']}. " if report.get("baseline") else "")
        + f"Accuracy = mean over question families; kept = vs. {reference}; same answers = share of "
        "answers identical to that row's; hard @b = share right of the questions the image "
        "down-sampled to b tokens gets wrong; layer mean = visual tokens per LLM layer, mean over the "
        "questions; GFLOPs = analytic prefill, mean over the questions (each with its own words, its "
        "image's views and its visual tokens per layer; models/flops.py); ceiling × = the speed-up those FLOPs allow; × = measured prefill speed-up.",
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
            *[_hard_cell(r, b) for b in hard],
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
    lines += training_lines(rows)
    lines += paired_lines(rows)
    lines += statistics_lines(rows)
    return "\n".join(lines) + "\n"


def _samples_per_second(stage: dict) -> str:
    rate = stage.get("samples_per_second")
    return "-" if rate is None else f"{rate:.1f}"


def _stage_text(stage: dict) -> str:
    return (
        f"stage {stage['name']!r}, {stage['steps']} steps in {stage['seconds']:.0f} s, "
        f"{_samples_per_second(stage)} samples/s"
    )


def training_lines(rows: list[dict]) -> list[str]:
    """The stages of each row a vtc run trained, from its meta.json: what compression does to
    training speed, beside what it does to inference."""
    trained = [r for r in rows if r.get("training")]
    if not trained:
        return []
    lines = [
        "",
        "Training, as each run recorded it (samples/s: training samples a second over a stage's "
        "optimizer steps after its first; seconds: the stage's wall time, setup included):",
        "",
        "| method | stage | steps | seconds | samples/s |",
        "|---|---|---|---|---|",
    ]
    for r in trained:
        for stage in r["training"]:
            cells = [r["method"], stage["name"], str(stage["steps"]), f"{stage['seconds']:.1f}"]
            lines.append("| " + " | ".join([*cells, _samples_per_second(stage)]) + " |")
    return lines


def statistics_lines(rows: list[dict]) -> list[str]:
    """What each row's components counted over its questions (`Compressor.statistics`, e.g.
    DyVTE's exit layers), one line per row and component (markdown)."""
    counted = [(r, name, stats) for r in rows for name, stats in r.get("statistics", {}).items()]
    if not counted:
        return []
    lines = ["", "What the components counted over the questions each row answered:", ""]
    for r, name, stats in counted:
        budget = "" if r["budget"] is None else f" @{r['budget']}"
        lines.append(
            f"- {r['method']}{budget}, {name}: " + "; ".join(f"{k} {_stat(v)}" for k, v in stats.items())
        )
    return lines


def _stat(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_stat(v)}" for k, v in value.items())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def paired_lines(rows: list[dict]) -> list[str]:
    """The `--setting` rows against the model as trained, question by question (markdown)."""
    changed = [r for r in rows if "vs_model" in r]
    if not changed:
        return []
    lines = [
        "",
        "The model with a setting changed at test time against the model as trained, on the "
        "questions both answered: right by one only, and the exact McNemar p of that split.",
        "",
        "| row | questions | accuracy − model's | right by the model only | right by this only | exact McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    model = next(r for r in rows if r["method"] == "model")
    for r in changed:
        pair = r["vs_model"]
        lines.append(
            f"| {r['method']} | {pair['questions']} | {100 * (r['accuracy'] - model['accuracy']):+.1f} points | "
            f"{pair['right_by_model_only']} | {pair['right_by_this_only']} | {pair['p']:.3g} |"
        )
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def figure(report: dict):
    """Accuracy vs. visual tokens, vs. prefill FLOPs and, when the rows were timed, vs. the
    measured batch-N prefill latency: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = "prefill_ms_batchN" in report["rows"][0]
    axes_x = [
        ("visual tokens (mean over LLM layers)", lambda r: r["visual_tokens_layer_mean"]),
        ("prefill GFLOPs (analytic)", lambda r: r["flops"]["total"] / 1e9),
    ]
    if timed:
        batch = report["rows"][0]["batch_n"]
        axes_x.append((f"prefill ms at batch {batch} (measured)", lambda r: r["prefill_ms_batchN"]))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.5 * len(axes_x), 4.2))
    by_method: dict[str, list[dict]] = {}
    for row in report["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows = sorted(rows, key=lambda r: r["flops"]["total"])
        style = {"marker": "*", "markersize": 12} if method in ("baseline", "model") else {"marker": "o"}
        accuracy = [100 * r["accuracy"] for r in rows]
        for ax, (_, x) in zip(axes, axes_x, strict=True):
            ax.plot([x(r) for r in rows], accuracy, label=method, **style)
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
    for ax, (label, _) in zip(axes, axes_x, strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(report["source"], fontsize=9)
    fig.tight_layout()
    return fig
