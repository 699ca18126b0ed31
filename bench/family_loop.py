"""The training loop that `text_scene.py` and `cell_oracle.py` share: a fresh model trained on
first-answer-token cross-entropy, scored on held-out questions of each family as it goes.

Items are tuples whose first field is the family and whose last is the answer; `predict(items)`
returns the logits at the answer position (B, V) and the answers' first token (B,).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from lookup import add_llm_shape_arguments  # a sibling bench

from train.accuracy import most_common_share
from train.module import warmup_schedule


def add_loop_arguments(parser: argparse.ArgumentParser, steps: int, eval_every: int, seed_help: str) -> None:
    """The options of `train_and_score`, the held-out size, the fresh LLM's shape and threads."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    add_llm_shape_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)


def start(args: argparse.Namespace, known) -> list[str]:
    """Check `args.families` against `known`, set the threads and the seed; the chosen families."""
    families = args.families.split(",")
    unknown = set(families) - set(known)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return families


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (B, L) of `prompts` padded on the left, so that every row ends at the position
    where the answer is predicted; their attention mask and position ids (0 at each prompt's start)."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def first_answer_tokens(items, tokenizer) -> torch.Tensor:
    """(B,) the first token of each item's answer (its last field): what is scored."""
    return torch.tensor([tokenizer(item[-1], add_special_tokens=False).input_ids[0] for item in items])


@torch.no_grad()
def family_accuracy(model, predict, test, families) -> dict[str, float]:
    """Held-out first-answer-token accuracy of each family."""
    model.eval()
    hits = []
    for start in range(0, len(test), 256):
        logits, answers = predict(test[start : start + 256])
        hits += (logits.argmax(-1) == answers).tolist()
    model.train()
    return {
        f: sum(h for h, (g, *_) in zip(hits, test, strict=True) if g == f) / sum(g == f for g, *_ in test)
        for f in families
    }


def train_and_score(model, predict, next_batch, test, families, args) -> list:
    """`args.steps` AdamW steps (lr `args.lr`, 3 % warm-up then cosine, no weight decay, gradients
    clipped at 1) on `next_batch(rng)`, with `rng` seeded by `args.seed`; scores `test` every
    `args.eval_every` steps and at the end. Returns [(step, seconds, {family: accuracy})]."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(args.steps, 0.03))
    rng, started, curve = random.Random(args.seed), time.time(), []
    for step in range(1, args.steps + 1):
        logits, answers = predict(next_batch(rng))
        loss = F.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            scores = family_accuracy(model, predict, test, families)
            curve.append((step, time.time() - started, scores))
            shown = "  ".join(f"{f} {s:.3f}" for f, s in scores.items())
            print(f"step {step:5d}  {curve[-1][1]:5.0f} s  loss {loss.item():.3f}  {shown}", flush=True)
    return curve


def print_curve(title: str, curve, test, families) -> None:
    """The curve as a Markdown table, under each family's most-common-answer baseline."""
    priors = {
        family: most_common_share([item[-1] for item in test if item[0] == family]) for family in families
    }
    print(f"\n{title}")
    print("| step (seconds) | " + " | ".join(families) + " |\n|---|" + "---|" * len(families))
    print("| always the most common answer | " + " | ".join(f"{priors[f]:.3f}" for f in families) + " |")
    for step, seconds, scores in curve:
        print(f"| {step} ({seconds:.0f} s) | " + " | ".join(f"{scores[f]:.3f}" for f in families) + " |")
