"""Held-out accuracy: questions about images asked as single-turn prompts (`<image>\\n{question}`),
answered by greedy decoding, scored by exact match per question family.

Questions come from the synthetic test split (every question of every test image) or from a
LLaVA-style question file (`{"question_id", "image", "text"}` per line, optional `answer` /
`answers` and `category`), the format LLaVA's `model_vqa` scripts read.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data.dataset import collate, load_views
from data.errors import UserError
from data.shards import ShardIndex
from data.synth import final_answer
from data.templates import Template, get_template


@dataclass(frozen=True)
class Question:
    id: str
    image: str  # key for the question set's image reader
    family: str
    text: str
    answers: tuple[str, ...] = ()  # empty: answered but not scored


@dataclass
class QuestionSet:
    questions: list[Question]
    read_image: Callable[[str], bytes]
    name: str = "synthetic test split"
    # the scored part of a generated answer (synthetic answers first name cells: `b3 . yes`)
    answer_of: Callable[[str], str] = lambda text: text
    files: tuple[
        Path, ...
    ] = ()  # what the questions and images are read from (shards; a question file, images)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (VQA-style normalisation)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def questions_of(record: dict) -> list[tuple[str, str, str]]:
    """(family, question, answer) of every turn; family 'all' when the record names none."""
    convs = record["conversations"]
    families = record.get("families") or ["all"] * (len(convs) // 2)
    return [
        (families[i // 2], convs[i]["value"].replace("<image>", "").strip(), convs[i + 1]["value"])
        for i in range(0, len(convs) - 1, 2)
    ]


def synthetic_questions(shards: ShardIndex, limit: int | None = None) -> QuestionSet:
    """Every question of the first `limit` images of a shard folder, scored on the final answer
    (`data.synth.final_answer`: what follows a grounded answer's cells)."""
    out = []
    for index in range(min(len(shards), limit or len(shards))):
        for turn, (family, question, answer) in enumerate(questions_of(shards.record(index))):
            out.append(Question(f"{index}-{turn}", str(index), family, question, (final_answer(answer),)))
    return QuestionSet(
        out, lambda key: shards.image_bytes(int(key)), answer_of=final_answer, files=tuple(shards.paths)
    )


def file_questions(path: str | Path, image_dir: str | Path) -> QuestionSet:
    """A LLaVA question file (JSON lines) with images relative to `image_dir`. A line that is
    not a question, or whose question_id an earlier line has (answers are kept by id, so one
    of the two would be scored with the other's answer), is an error naming the file and line."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such question file")
    if not Path(image_dir).is_dir():  # else every question would be skipped, one by one
        raise UserError(f"{image_dir}: no such image folder (for {path})")
    out, lines = [], {}  # question id → the line it is on
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row.get("answers", row.get("answer", ()))
            answers = (answers,) if isinstance(answers, str) else tuple(str(a) for a in answers)
            out.append(
                Question(
                    str(row["question_id"]),
                    str(row["image"]),
                    str(row.get("category", "all")),
                    row["text"].replace("<image>", "").strip(),
                    answers,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path}:{number}: not a question line ({type(err).__name__}: {err})") from None
        first = lines.setdefault(out[-1].id, number)
        if first != number:
            raise UserError(f"{path}:{number}: question_id {out[-1].id} again (first on line {first})")
    root = Path(image_dir)
    images = sorted({root / q.image for q in out})  # a replaced image changes what is measured
    return QuestionSet(
        out, lambda key: (root / key).read_bytes(), name=str(path), files=(Path(path), *images)
    )


@torch.no_grad()
def answer_questions(
    model,
    tokenizer,
    questions: QuestionSet,
    image_size: int,
    template: str | Template = "vicuna_v1",
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    image_first: bool = True,
    desc: str = "evaluate",
    known: dict[str, dict] | None = None,
    on_answers: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """Greedy answers: {question id: {"text", "visual_tokens" (that entered the LLM),
    "visual_tokens_layers" (in each decoder layer's sequence), and with crops "grid" (rows,
    cols)}}; a question whose image cannot be read gets {"skipped": reason} instead (never a
    crash half way). `template`: the format the model was instruction-tuned with (a name or a Template, e.g. a `chat` one). `known`: answers
    given before (a resumed evaluation), taken as they are; `on_answers` is called with each
    batch's new answers (and the skipped questions') as they come."""
    tmpl = get_template(template) if isinstance(template, str) else template
    tmpl.check(tokenizer)
    stops = tmpl.stop_ids(tokenizer)
    was_training = model.training
    model.eval()
    views: dict[str, tuple | str] = {}
    prompts: dict[str, list[int]] = {}  # question sets repeat question texts: tokenize each once
    out: dict[str, dict] = dict(known or {})
    skipped: dict[str, dict] = {}
    jobs = []
    for q in questions.questions:
        if q.id in out:
            continue
        if q.image not in views:
            try:
                views[q.image] = load_views(questions.read_image(q.image), image_size, model.view_tiling)
            except Exception as err:  # missing or corrupt image: skip its questions, say why
                views[q.image] = f"image {q.image!r}: {type(err).__name__}: {err}"
        if isinstance(views[q.image], str):
            skipped[q.id] = {"skipped": views[q.image]}
            continue
        text = "<image>\n" + q.text if image_first else q.text + "\n<image>"
        if text not in prompts:
            prompts[text] = tmpl.prompt(text, tokenizer, model.image_token_id)
        jobs.append((q, prompts[text]))
    out |= skipped
    if skipped and on_answers is not None:
        on_answers(skipped)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = jobs[start : start + batch_size]
        batch = collate(
            [_prompt_item(q, prompt, views[q.image]) for q, prompt in chunk], tokenizer.pad_token_id
        )
        tokens, visual_in, visual_layers = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["pixel_values"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            image_grids=batch.get("image_grids"),
        )
        answered = {}
        rows = zip(chunk, tokens.tolist(), visual_in.tolist(), visual_layers.tolist(), strict=True)
        for (q, _), ids, visual, layers in rows:
            ids = ids[: next((i for i, token in enumerate(ids) if token in stops), len(ids))]
            answered[q.id] = {
                "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "visual_tokens": visual,
                "visual_tokens_layers": layers,
            }
            grid = views[q.image][1]
            if grid is not None:  # the crops its image was cut into (what its tower computed)
                answered[q.id]["grid"] = list(grid)
        out |= answered
        if on_answers is not None:
            on_answers(answered)
    model.train(was_training)
    return out


def _judge(questions: QuestionSet, q: Question, answers: dict[str, dict]) -> tuple[str, list[str]] | None:
    """(normalised final answer, normalised references) of question `q`, or None if it has no
    reference answer or was not answered (skipped)."""
    got = answers.get(q.id, {})
    if not q.answers or "text" not in got:
        return None
    return normalize_answer(questions.answer_of(got["text"])), [normalize_answer(a) for a in q.answers]


def exact_mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance, were A and B equally good on these
    questions, of a split of the discordant questions (one right, the other wrong) at least this
    uneven (a binomial test at 1/2 on only_a + only_b questions)."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def paired(right_a: dict[str, bool], right_b: dict[str, bool]) -> dict:
    """Two models on the questions both answered (`right_answers` of each), question by
    question: how many each alone got right, and the exact McNemar p of that split."""
    both = right_a.keys() & right_b.keys()
    only_a = sum(right_a[q] and not right_b[q] for q in both)
    only_b = sum(right_b[q] and not right_a[q] for q in both)
    return {"questions": len(both), "only_a": only_a, "only_b": only_b, "p": exact_mcnemar(only_a, only_b)}


def right_answers(questions: QuestionSet, answers: dict[str, dict]) -> dict[str, bool]:
    """{question id: answered right} for every question with a reference that was answered."""
    out = {}
    for q in questions.questions:
        judged = _judge(questions, q, answers)
        if judged is not None:
            out[q.id] = judged[0] in judged[1]
    return out


def visual_layer_mean(visual_layers: list[float]) -> float:
    """Visual tokens per decoder layer, on average over the layers: what `vtc evaluate` reports
    as the layer mean, fewer than entered the LLM where a component prunes inside it (FastV,
    CoViPAL, DyVTE, LLaVolta)."""
    return sum(visual_layers) / len(visual_layers)


def score(questions: QuestionSet, answers: dict[str, dict]) -> dict:
    """{"accuracy" (mean over families, so no family dominates), "per_family", "per_question"
    (mean over questions), "count", "skipped", "visual_tokens" (mean into the LLM),
    "visual_tokens_layer_mean" (mean over the LLM's layers and the questions: fewer where a
    component prunes inside the LLM)}; with several reference answers per question also
    "vqa_accuracy" (min(1, matching answers / 3))."""
    correct, total, vqa = defaultdict(float), defaultdict(int), []
    asked = [a for a in answers.values() if "text" in a]
    visual = [a["visual_tokens"] for a in asked]
    # (answers recorded without the per-layer counts: as many in every layer as entered)
    layers = [visual_layer_mean(a.get("visual_tokens_layers") or [a["visual_tokens"]]) for a in asked]
    for q in questions.questions:
        judged = _judge(questions, q, answers)
        if judged is None:
            continue
        pred, refs = judged
        correct[q.family] += pred in refs
        total[q.family] += 1
        vqa.append(min(1.0, refs.count(pred) / 3))
    count = sum(total.values())
    per_family = {f: correct[f] / total[f] for f in sorted(total)}
    result = {
        "accuracy": sum(per_family.values()) / max(len(per_family), 1),
        "per_family": per_family,
        "per_question": sum(correct.values()) / max(count, 1),
        "count": count,
        "skipped": sorted(qid for qid, a in answers.items() if "skipped" in a),
        "visual_tokens": sum(visual) / max(len(visual), 1),
        "visual_tokens_layer_mean": sum(layers) / max(len(layers), 1),
    }
    if any(len(q.answers) > 1 for q in questions.questions):
        result["vqa_accuracy"] = sum(vqa) / max(len(vqa), 1)
    return result


def agreement(questions: QuestionSet, answers: dict[str, dict], reference: dict[str, dict]) -> float | None:
    """Share of the questions both answered whose final answers are the same (normalised) as in
    `reference` (the uncompressed model's): a method can keep accuracy while changing answers,
    or keep answers that were wrong. Needs no reference answers. None if none were compared."""
    same = compared = 0
    for q in questions.questions:
        got, ref = answers.get(q.id, {}), reference.get(q.id, {})
        if "text" in got and "text" in ref:
            compared += 1
            same += normalize_answer(questions.answer_of(got["text"])) == normalize_answer(
                questions.answer_of(ref["text"])
            )
    return same / compared if compared else None


def most_common_share(answers: list[str]) -> float:
    """The accuracy of always giving the most common of `answers`."""
    return max(answers.count(a) for a in set(answers)) / len(answers)


def answer_prior(questions: QuestionSet) -> dict[str, float]:
    """Per family, the accuracy of always giving its most common (scored) answer: the chance
    level a model that ignores the image can reach on these questions."""
    refs = defaultdict(list)
    for q in questions.questions:
        if q.answers:
            refs[q.family].append(normalize_answer(q.answers[0]))
    return {family: most_common_share(answers) for family, answers in sorted(refs.items())}


def mean_prior(prior: dict[str, float]) -> float:
    """The answer prior averaged over families, as accuracy is."""
    return sum(prior.values()) / len(prior)


def evaluate_accuracy(
    model,
    tokenizer,
    shards: ShardIndex,
    image_size: int,
    template: str | Template = "vicuna_v1",
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    image_first: bool = True,
) -> dict:
    """`score` of the model's answers to every question of the first `limit` test images, with
    each family's answer prior (`answer_prior`) beside it."""
    questions = synthetic_questions(shards, limit)
    answers = answer_questions(
        model, tokenizer, questions, image_size, template, batch_size, max_new_tokens, progress, image_first
    )
    result = score(questions, answers)
    result.pop("skipped")
    result["answer_prior"] = answer_prior(questions)
    return result


def _prompt_item(question: Question, prompt: list[int], views: tuple) -> dict:
    """A dataset-shaped item (see data.dataset.collate) for a prompt on a decoded image."""
    pixels, grid = views
    item = {"id": question.id, "input_ids": prompt, "labels": prompt, "pixel_values": pixels}
    if grid is not None:
        item["image_grid"] = grid
    return item
