"""Held-out exact-match accuracy: every question of every test image asked as a single-turn
prompt (`<image>\\n{question}`), answered by greedy decoding, scored per question family."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from tqdm import tqdm

from data.dataset import collate, load_views
from data.shards import ShardIndex
from data.templates import get_template


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


@torch.no_grad()
def evaluate_accuracy(
    model,
    tokenizer,
    shards: ShardIndex,
    image_size: int,
    template: str = "vicuna_v1",
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 4,
    progress: bool = True,
    image_first: bool = True,
) -> dict:
    """Returns {"accuracy" (mean over families, so no family dominates), "per_family",
    "per_question" (mean over all questions), "count", "visual_tokens" (mean into the LLM)}.
    Prompts are `<image>\n{question}` (LLaVA's order), or `{question}\n<image>` without
    `image_first`."""
    tmpl = get_template(template)
    was_training = model.training
    model.eval()
    jobs = []  # (image index, family, prompt ids, answer)
    for index in range(min(len(shards), limit or len(shards))):
        for family, question, answer in questions_of(shards.record(index)):
            text = "<image>\n" + question if image_first else question + "\n<image>"
            prompt = tmpl.prompt(text, tokenizer, model.image_token_id)
            jobs.append((index, family, prompt, answer))
    correct, total, visual = defaultdict(int), defaultdict(int), []
    images: dict[int, tuple] = {}
    for start in tqdm(range(0, len(jobs), batch_size), desc="evaluate", disable=not progress, unit="batch"):
        chunk = jobs[start : start + batch_size]
        batch = collate(
            [
                _prompt_item(shards, index, prompt, image_size, model.hd_grids, images)
                for index, _, prompt, _ in chunk
            ],
            tokenizer.pad_token_id,
        )
        device = next(model.parameters()).device
        out, visual_in = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["pixel_values"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            image_grids=batch.get("image_grids"),
        )
        visual.extend(visual_in.tolist())
        for (_, family, _, answer), tokens in zip(chunk, out.tolist(), strict=True):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            hit = normalize_answer(tokenizer.decode(tokens, skip_special_tokens=True)) == normalize_answer(
                answer
            )
            correct[family] += hit
            total[family] += 1
    model.train(was_training)
    count = sum(total.values())
    per_family = {f: correct[f] / total[f] for f in sorted(total)}
    return {
        "accuracy": sum(per_family.values()) / max(len(per_family), 1),
        "per_family": per_family,
        "per_question": sum(correct.values()) / max(count, 1),
        "count": count,
        "visual_tokens": sum(visual) / max(len(visual), 1),
    }


def _prompt_item(shards: ShardIndex, index: int, prompt: list[int], size: int, hd_grids, cache: dict) -> dict:
    """A dataset-shaped item (see data.dataset.collate) for a prompt on test image `index`,
    whose views are decoded once."""
    if index not in cache:
        cache[index] = load_views(shards.image_bytes(index), size, hd_grids)
    views, grid = cache[index]
    item = {"id": str(index), "input_ids": prompt, "labels": prompt, "pixel_values": views}
    if grid is not None:
        item["image_grid"] = grid
    return item
