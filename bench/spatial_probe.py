"""Can a fresh tiny Llama (the tiny base's LLM shape) learn the last step of a spatial answer?

Given the question and the cells a grounded answer has already named, predict yes or no:

- `compare`: two objects' cells, `Is the red circle left of the blue square ? b3 d1 .` → yes
  (left of / right of / above / below: the cells' columns or rows compared)
- `half`: one object's cell, `Is the circle in the left half ? b3 .` → yes
  (left / right / top / bottom half: a lookup of the cell)

Random cells of a 4×4 grid, batch 64, lr 1e-3, first-token cross-entropy on the answer; the
held-out accuracy of 1000 fresh items every `--eval-every` steps, next to the answer prior.
bench/README.md ("Try 7") has what it found and what a base trained on halves did.

    python bench/spatial_probe.py --task compare|half [--steps 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from data.synth import COLUMNS
from models.tiny import tiny_tokenizer

GRID = 4
HALVES = {"left": ("col", -1), "right": ("col", 1), "top": ("row", -1), "bottom": ("row", 1)}
RELATIONS = {
    "left of": lambda a, b: a[1] < b[1],
    "right of": lambda a, b: a[1] > b[1],
    "above": lambda a, b: a[0] < b[0],
    "below": lambda a, b: a[0] > b[0],
}


def cell(rc: tuple[int, int]) -> str:
    return f"{COLUMNS[rc[1]]}{rc[0] + 1}"


def item(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "compare":
        a, b = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], 2)
        relation = rng.choice(list(RELATIONS))
        text = f"Is the red circle {relation} the blue square ? {cell(a)} {cell(b)} ."
        return text, "yes" if RELATIONS[relation](a, b) else "no"
    a = (rng.randrange(GRID), rng.randrange(GRID))
    half = rng.choice(list(HALVES))
    axis, side = HALVES[half]
    inside = side * ((a[1] if axis == "col" else a[0]) + 0.5 - GRID / 2) > 0
    return f"Is the circle in the {half} half ? {cell(a)} .", "yes" if inside else "no"


def batch(task, rng, size, tokenizer):
    """Left-padded prompts (B, L), their mask, and the answer's token (B,)."""
    items = [item(task, rng) for _ in range(size)]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text, _ in items]
    length = max(map(len, ids))
    pad = tokenizer.pad_token_id
    x = torch.tensor([[pad] * (length - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i in ids])
    y = torch.tensor(tokenizer.convert_tokens_to_ids([answer for _, answer in items]))
    return x, mask, y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=("compare", "half"), required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # words the shipped vocabulary lacks (each task adds only its own, as when it was measured)
    tokenizer = tiny_tokenizer(["in half top bottom"] if args.task == "half" else [])
    assert tokenizer.unk_token_id not in batch(args.task, random.Random(0), 50, tokenizer)[0], "unknown words"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng, test = random.Random(args.seed + 1), batch(args.task, random.Random(99), 1000, tokenizer)
    prior = max(float((test[2] == test[2][0]).float().mean()), float((test[2] != test[2][0]).float().mean()))
    print(f"task {args.task}: answer prior {100 * prior:.1f} %")
    started = time.time()
    for step in range(1, args.steps + 1):
        x, mask, y = batch(args.task, rng, 64, tokenizer)
        loss = F.cross_entropy(model(x, attention_mask=mask).logits[:, -1], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                predicted = model(test[0], attention_mask=test[1]).logits[:, -1].argmax(-1)
            accuracy = float((predicted == test[2]).float().mean())
            print(f"step {step}: held-out {100 * accuracy:.1f} % ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
