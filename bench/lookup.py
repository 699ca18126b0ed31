"""Why the tiny base stalls below target: how fast a fresh tiny LLM learns to answer one
question family (`--family`, default colour: the colour of the object at a named cell) on the
trained tiny base's (frozen) vision features.

Ways to train the same projector + Llama (the tiny base's shape) from scratch, `--steps` steps of `--batch`
questions of the family each, scored after every `--eval-every` steps on the held-out split's
questions of that family (first answer token, teacher-forced), asked with the LLaVA-1.5 prompt
unless the variant trains on another layout:

- `vicuna`: the questions in the LLaVA-1.5 prompt, as `vtc train` asks them
             (`<s>{system} USER: <image>\\nWhat colour is the object at row two column three?
             ASSISTANT: red</s>`): the answer is read where `ASSISTANT:` ends, several tokens
             after the words naming the cell.
- `oracle`:  the same, with the vision features replaced by perfect one-hot region attributes
             (colour, shape, size, dot, row, column of every patch's cell): what the LLM learns
             when the vision side is solved.
- `direct`:  `<s><image>row two column three` → `red</s>`: the answer is read right at the
             words naming the cell (scored on `direct` prompts, the format it trained on).
- `direct+vicuna`: `--direct-steps` of `direct`, then `vicuna` for `--steps`.
- `bare`:    `<s><image>{question}` → `{answer}</s>`: the question without the system prompt and
             the roles, the easiest layout open to every family (scored on `bare` prompts).
- `first`:   `<s>{question}<image>ASSISTANT:` → `{answer}</s>`: the question before the image, so
             every visual token can already compare itself with the question.
- `tail`:    `bare` with the question cut after its last key word (`<s><image>How many red`,
             `<s><image>Is there a red circle`): the answer is read right at the key word.

`direct` needs a family that names a cell (colour, shape). `--oracle` gives every variant the
one-hot features of `oracle`. `--llm-width/--llm-heads/--llm-layers` change the fresh LLM's shape
(default: the tiny base's); `--llm-init-std` redraws its weights with another standard deviation.

`--cell-names` names a cell with one word ("b3": column letter, row number) instead of
"row three column two", in questions and prompts alike (the tokenizer gets those words).

This bench isolates the LLM's learning with a plain loop over cached features; the recipes
train through Lightning (bench/tiny_base.py measures those).

    python bench/lookup.py [--family colour] [--variants vicuna,oracle,direct,direct+vicuna] [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from data import IGNORE_INDEX
from data.dataset import collate, load_views
from data.synth import FAMILIES, region_classes, region_targets
from data.templates import get_template
from models.build import ComponentSpec, assemble, load_base
from models.compressors.base import VisionFeatures
from models.tiny import TinyConfig, tiny_llava_config, tiny_tokenizer
from models.vision import VisionTower
from train.accuracy import most_common_share, questions_of
from train.datamodule import split_shards
from train.module import warmup_schedule
from train.recipe import DEFAULT_RECIPE, load_recipe, resolve_base

VARIANTS = ("vicuna", "oracle", "direct", "direct+vicuna", "bare", "first", "tail")
DEFAULT_VARIANTS = ("vicuna", "oracle", "direct", "direct+vicuna")
SINGLE_LAYOUTS = ("direct", "bare", "first", "tail")  # variants trained and scored on their own layout
CELL_FAMILIES = ("colour", "shape")  # the families whose questions name a cell
# The first synthetic language named cells "row three column two"; the current one already uses
# one word ("b2"), so on today's data --cell-names changes nothing.
ORDINALS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
CELL_WORDS = re.compile(r"row (\w+) column (\w+)")
CELL_NAMES = [f"{col}{row}" for col in "abcdefgh" for row in range(1, 9)]


def one_word_cells(text: str) -> str:
    """Name cells with one word: 'row three column two' becomes 'b3' (column letter, row number)."""
    return CELL_WORDS.sub(lambda m: "abcdefgh"[ORDINALS.index(m[2])] + str(1 + ORDINALS.index(m[1])), text)


def add_llm_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """`--llm-width/--llm-heads/--llm-layers`, defaulting to the tiny base's LLM."""
    tiny = TinyConfig()
    parser.add_argument("--llm-width", type=int, default=tiny.llm_width, help="the fresh LLM's hidden size")
    parser.add_argument("--llm-heads", type=int, default=tiny.llm_heads)
    parser.add_argument("--llm-layers", type=int, default=tiny.llm_layers)


def llm_shape(args: argparse.Namespace) -> TinyConfig:
    """The tiny config with the LLM shape the command line asked for."""
    return TinyConfig(llm_width=args.llm_width, llm_heads=args.llm_heads, llm_layers=args.llm_layers)


def family_questions(shards, limit: int, family: str) -> list[tuple[int, str, str]]:
    """(image index, question, answer) for every `family` question of the first `limit` images."""
    return [
        (index, question, answer)
        for index in range(min(limit, len(shards)))
        for asked, question, answer in questions_of(shards.record(index))
        if asked == family
    ]


class Bench:
    def __init__(self, args):
        recipe = load_recipe(DEFAULT_RECIPE, check_machine=False)
        base = Path(resolve_base("tiny-llava"))  # the shipped base's vision tower
        self.args = args
        self.train_shards, self.test_shards = (
            split_shards(recipe.data, "train"),
            split_shards(recipe.data, "test"),
        )
        self.train_q = family_questions(self.train_shards, args.images, args.family)
        self.test_q = family_questions(self.test_shards, args.test_images, args.family)
        trained, _ = load_base(str(base))
        config = trained.config
        self.tower = VisionTower(
            trained.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy
        ).eval()
        self.image_size, self.scene_grid = recipe.data.synthetic.image_size, recipe.data.synthetic.grid
        self.template = get_template("vicuna_v1")
        self.features = {}  # (split, oracle) → (images, 64, Dv)

    def cached(self, split: str, oracle: bool) -> torch.Tensor:
        """The frozen tower's LLaVA features (or one-hot region attributes) of every image."""
        if (split, oracle) not in self.features:
            shards = self.train_shards if split == "train" else self.test_shards
            count = self.args.images if split == "train" else self.args.test_images
            self.features[split, oracle] = (self.oracle if oracle else self.encode)(shards, count)
        return self.features[split, oracle]

    @torch.no_grad()
    def encode(self, shards, count: int) -> torch.Tensor:
        out = []
        for start in range(0, count, 256):
            pixels = torch.stack(
                [
                    load_views(shards.image_bytes(i), self.image_size)[0]
                    for i in range(start, min(count, start + 256))
                ]
            )
            out.append(self.tower(pixels).selected)
        return torch.cat(out)

    def oracle(self, shards, count: int) -> torch.Tensor:
        width, classes = self.tower.model.config.hidden_size, region_classes(self.scene_grid)
        rows = []
        for index in range(count):
            targets = torch.tensor(region_targets(shards.record(index)["scene"], self.tower.grid))  # (N, 6)
            onehot = torch.cat([F.one_hot(targets[:, a], c).float() for a, c in enumerate(classes)], -1)
            rows.append(F.pad(onehot, (0, width - onehot.shape[1])))
        return torch.stack(rows)

    def item(self, question: str, answer: str, layout: str, tokenizer, image_id: int) -> dict:
        if self.args.cell_names:
            question = one_word_cells(question)
        if layout == "vicuna":  # exactly as `vtc train` encodes a conversation
            turn = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
            encoded = self.template.encode(turn, tokenizer, image_id, max_length=10_000)
            ids, labels = encoded.input_ids, encoded.labels
        else:
            words = tokenizer(self.prompt_words(question, layout), add_special_tokens=False).input_ids
            if layout == "first":
                cue = tokenizer("ASSISTANT:", add_special_tokens=False).input_ids
                prompt = [tokenizer.bos_token_id, *words, image_id, *cue]
            else:
                prompt = [tokenizer.bos_token_id, image_id, *words]
            target = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        return {"id": question, "input_ids": ids, "labels": labels, "pixel_values": None}

    @staticmethod
    def prompt_words(question: str, layout: str) -> str:
        """The words a layout asks: the cell's name (direct), the question up to its last key word
        (tail), or the whole question (bare, first)."""
        if layout == "direct":
            return question.split(" at ")[-1].rstrip("?")
        if layout == "tail":
            return question.replace(" objects are there?", "").replace("s are there?", "").rstrip("?")
        return question

    def run(self, variant: str) -> list[tuple[int, float, float]]:
        """[(step, seconds, held-out accuracy on the family)] for one fresh model."""
        args = self.args
        tokenizer = tiny_tokenizer(CELL_NAMES if args.cell_names else ())
        torch.manual_seed(args.seed)
        model = assemble(
            LlavaForConditionalGeneration(tiny_llava_config(llm_shape(args), tokenizer)),
            ComponentSpec("mlp2x_gelu"),
        )
        if args.llm_init_std:
            for module in model.llm.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    torch.nn.init.normal_(module.weight, std=args.llm_init_std)
        trainable = [p for name, p in model.named_parameters() if not name.startswith("vision.")]
        oracle = variant == "oracle" or args.oracle
        phases = [("vicuna", args.steps)]
        if variant in SINGLE_LAYOUTS:
            phases = [(variant, args.steps)]
        elif variant == "direct+vicuna":
            phases = [("direct", args.direct_steps), ("vicuna", args.steps)]
        score_layout = variant if variant in SINGLE_LAYOUTS else "vicuna"
        rng = random.Random(args.seed)
        curve, started, done = [], time.time(), 0

        def forward(items, features):
            batch = collate(items, tokenizer.pad_token_id)
            visual = model.projector(VisionFeatures(features, (), self.tower.grid))
            return model.llm.run(
                model.merge(batch["input_ids"], batch["attention_mask"], visual, batch["labels"])
            )

        @torch.no_grad()
        def accuracy() -> float:
            model.eval()
            hits, features = 0, self.cached("test", oracle)
            for start in range(0, len(self.test_q), 256):
                chunk = self.test_q[start : start + 256]
                items = [self.item(q, a, score_layout, tokenizer, model.image_token_id) for _, q, a in chunk]
                state = forward(items, features[[i for i, _, _ in chunk]])
                answer_at = (state.labels != IGNORE_INDEX).int().argmax(1) - 1  # last prompt position
                logits = model.llm.lm_head(state.hidden[torch.arange(len(chunk)), answer_at])
                hits += (
                    (logits.argmax(-1) == state.labels[torch.arange(len(chunk)), answer_at + 1]).sum().item()
                )
            model.train()
            return hits / len(self.test_q)

        for layout, steps in phases:
            optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(steps, 1 / 30))
            features = self.cached("train", oracle)
            for step in range(steps):
                chosen = [rng.choice(self.train_q) for _ in range(args.batch)]
                items = [self.item(q, a, layout, tokenizer, model.image_token_id) for _, q, a in chosen]
                state = forward(items, features[[i for i, _, _ in chosen]])
                targets = state.labels[:, 1:]
                where = targets != IGNORE_INDEX
                loss = F.cross_entropy(model.llm.lm_head(state.hidden[:, :-1][where]), targets[where])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                done += 1
                if done % args.eval_every == 0 or step == steps - 1:
                    curve.append((done, time.time() - started, accuracy()))
                    print(
                        f"  {variant:14s} {layout:7s} step {done:4d}  {curve[-1][1]:5.0f} s"
                        f"  {args.family} {curve[-1][2]:.3f}",
                        flush=True,
                    )
        return curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="colour", choices=FAMILIES)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--direct-steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--images", type=int, default=8000, help="training images (features are cached)")
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    add_llm_shape_arguments(parser)
    parser.add_argument("--cell-names", action="store_true", help='name cells with one word ("b3")')
    parser.add_argument("--oracle", action="store_true", help="every variant reads one-hot cell attributes")
    parser.add_argument(
        "--llm-init-std", type=float, default=0.0, help="redraw the fresh LLM's weights from N(0, std²)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.family not in CELL_FAMILIES and any("direct" in v for v in variants):
        raise SystemExit(f"`direct` names a cell: only for {', '.join(CELL_FAMILIES)}, not {args.family}")
    bench = Bench(args)
    results = {variant: bench.run(variant) for variant in variants}
    answers = [a for _, _, a in bench.test_q]
    prior = most_common_share(answers)
    features = "one-hot cell attributes" if args.oracle else "the base's vision features"
    print(
        f"\nheld-out {args.family} accuracy ({len(answers)} questions, {features};"
        f" always the most common answer: {prior:.3f}), by step"
    )
    print("| variant | accuracy at step (seconds) |\n|---|---|")
    for variant, curve in results.items():
        print(
            f"| {variant} | "
            + ", ".join(f"{acc:.3f} @ {step} ({secs:.0f} s)" for step, secs, acc in curve)
            + " |"
        )


if __name__ == "__main__":
    main()
