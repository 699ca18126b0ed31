"""The easiest setting the tiny base's LLM could face: how many steps does a fresh tiny Llama need
to match a question against a scene when the vision side is perfect and nothing else is in the way?

Each image is replaced by one token per grid cell (16 on the default 4×4 grid), the projection of
that cell's perfect one-hot attributes (colour, shape, size, dot colour, row, column: the dense
targets of the vision stage); the question follows at once, with no system prompt and no roles:

    <s>[cell 1] … [cell 16]Is there a red circle?  →  yes

Every batch holds fresh scenes of the default recipe's grid (training split), one question each,
from the families named by `--families`, drawn evenly; the held-out score asks `--test-images` test-split scenes
one question of each family (first answer token). Besides vtc's six families, two presence
questions that need half of exist's match can be mixed in:

- `has-colour`: "Is there a red object?"  (yes when any object has that colour)
- `has-shape`:  "Is there a circle?"      (yes when any object has that shape)

The held-out scenes are drawn from a fixed seed for the given `--families` (so a run prints its
own most-common-answer baseline). `--llm-width/--llm-heads/--llm-layers` change the fresh LLM's shape (default: the tiny base's).

    python bench/cell_oracle.py [--families exist] [--steps 3000] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import random

import family_loop as loop  # a sibling bench
import torch
import torch.nn.functional as F
from lookup import llm_shape
from torch import nn
from transformers import LlamaForCausalLM

from data.synth import (
    COLOURS,
    FAMILIES,
    SHAPES,
    Scene,
    askable,
    questions,
    random_scene,
    region_classes,
    region_targets,
)
from models.tiny import tiny_llava_config, tiny_tokenizer
from train.recipe import DEFAULT_RECIPE, load_recipe

PRESENCE = ("has-colour", "has-shape")


def presence_question(family: str, scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """A question that needs one attribute matched against every object."""
    if family == "has-colour":
        colour = rng.choice(list(COLOURS))
        return (
            family,
            f"Is there a {colour} object?",
            "yes" if any(o.colour == colour for o in scene.objects) else "no",
        )
    shape = rng.choice(SHAPES)
    return family, f"Is there a {shape}?", "yes" if any(o.shape == shape for o in scene.objects) else "no"


def cell_features(scene: Scene) -> torch.Tensor:
    """(G², C) perfect one-hot attributes of every cell, raster order."""
    classes = region_classes(scene.grid)
    targets = torch.tensor(region_targets(scene.to_json(), scene.grid))
    return torch.cat([F.one_hot(targets[:, i], n) for i, n in enumerate(classes)], dim=1).float()


def draw(split: str, family: str, grid: int, rng: random.Random) -> tuple[str, torch.Tensor, str, str]:
    """(family, cell features, question, answer) for a fresh scene of `split`."""
    scene = random_scene(rng, grid)
    while scene.split() != split or not askable(scene):  # as data.synth.make_sample draws them
        scene = random_scene(rng, grid)
    if family in PRESENCE:
        _, question, answer = presence_question(family, scene, rng)
    else:
        _, question, answer = next(q for q in questions(scene, rng) if q[0] == family)
    return family, cell_features(scene), question, answer


class CellLM(nn.Module):
    """A fresh tiny Llama reading `<s>`, one projected token per cell, then the question."""

    def __init__(self, args, tokenizer, feature_size: int):
        super().__init__()
        self.llm = LlamaForCausalLM(tiny_llava_config(llm_shape(args), tokenizer).text_config)
        width = self.llm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(feature_size, width), nn.GELU(), nn.Linear(width, width))
        self.tokenizer = tokenizer

    def forward(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, V) at the last position and the answers' first token (B,). Rows are
        left-padded; the cell tokens sit right after `<s>`."""
        tok = self.tokenizer
        cells = items[0][1].shape[0]
        prompts = [
            [tok.bos_token_id] + [tok.pad_token_id] * cells + tok(q, add_special_tokens=False).input_ids
            for _, _, q, _ in items
        ]
        ids, mask, positions = loop.left_padded(prompts, tok.pad_token_id)
        # each row's cells follow its `<s>`, the first position its mask keeps
        first = mask.argmax(1, keepdim=True)
        columns = torch.arange(ids.shape[1])
        cell_slots = (columns > first) & (columns <= first + cells)
        embeds = self.llm.get_input_embeddings()(ids)
        features = torch.stack([f for _, f, _, _ in items])  # (B, G², C)
        embeds = embeds.masked_scatter(cell_slots[..., None], self.projector(features))
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return logits.logits[:, -1], loop.first_answer_tokens(items, tok)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    known = (*FAMILIES, *PRESENCE)
    parser.add_argument("--families", default="exist", help=f"comma-separated, of {', '.join(known)}")
    loop.add_loop_arguments(
        parser, steps=3000, eval_every=500, seed_help="the fresh LLM's weights and the training scenes"
    )
    args = parser.parse_args()
    families = loop.start(args, known)

    grid = load_recipe(DEFAULT_RECIPE, check_machine=False).data.synthetic.grid
    test_rng = random.Random(f"cell-oracle/test/{grid}")  # the same held-out items whatever --seed
    test = [draw("test", family, grid, test_rng) for _ in range(args.test_images) for family in families]
    model = CellLM(args, tiny_tokenizer(), test[0][1].shape[1])
    curve = loop.train_and_score(
        model,
        model,
        lambda rng: [draw("train", rng.choice(families), grid, rng) for _ in range(args.batch)],
        test,
        families,
        args,
    )
    title = (
        f"held-out accuracy, one perfect token per cell ({args.test_images} test scenes, batch {args.batch})"
    )
    loop.print_curve(title, curve, test, families)


if __name__ == "__main__":
    main()
