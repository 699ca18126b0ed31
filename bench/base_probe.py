"""Does a LLaVA base look at the image? Held-out accuracy per family next to its answer prior,
and the same questions with the image taken away or scrambled, and with 4× fewer visual tokens:

- `image`: the test images as they are
- `blank`: every image replaced by a black one (no objects, no dot)
- `shuffled`: the projector's visual tokens permuted at random within each image (what is
  there survives, where it is does not)
- `pooled 4x`: training-free 2-D average pooling of the visual grid (`avgpool2d`, stride 2)

    python bench/base_probe.py [SOURCE] [--images 500] [--checkpoint CKPT_DIR]

SOURCE is a llava-hf folder (default: the shipped base) or a run directory; `--checkpoint` scores
one of a run's periodic checkpoints instead of its final weights (to follow a training run).
`--cells` also says, per family, how often the cells a grounded answer names are the right ones,
and how often the final answer is right when they are (is a miss in finding or in answering?).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from data.synth import FAMILIES, final_answer
from models.build import ComponentSpec, build
from train.accuracy import (
    QuestionSet,
    answer_prior,
    answer_questions,
    mean_prior,
    questions_of,
    score,
    synthetic_questions,
)
from train.datamodule import split_shards
from train.recipe import DataRecipe, load_recipe, resolve_base
from train.run import is_run_dir, load_trainables
from train.zero import load_state

VARIANTS = ("image", "blank", "shuffled", "pooled 4x")


def load(source: str, checkpoint: str | None, pooled: bool):
    """(Built, DataRecipe) for a llava-hf folder or a run (its final or a periodic checkpoint)."""
    compressors = [ComponentSpec("avgpool2d", {"stride": 2})] if pooled else []
    path = Path(source)
    if is_run_dir(path) or checkpoint:  # a running run has no meta.json yet
        recipe = load_recipe(path / "recipe.yaml", check_machine=False)
        model = recipe.model
        built = build(
            resolve_base(model.base),
            model.projector,
            [*model.compressors, *compressors],
            tiny=model.tiny,
            seed=recipe.seed,
        )
        if checkpoint:  # a periodic checkpoint keys the LightningModule's weights `model.…`
            tensors = load_file(str(Path(checkpoint) / "trainable.safetensors"))
            load_state(built.model, {k.removeprefix("model."): v for k, v in tensors.items()})
        else:
            load_trainables(built.model, str(path))
        return built, recipe.data
    return build(str(path), compressors=compressors), DataRecipe()


def print_cells(built, shards, images: int) -> None:
    """Per family: named cells right, and final answer right given right cells (grounded only)."""
    rows = {}
    questions = synthetic_questions(shards, images)
    references = {
        f"{index}-{turn}": answer
        for index in range(min(images, len(shards)))
        for turn, (_, _, answer) in enumerate(questions_of(shards.record(index)))
    }
    size = built.hf.config.vision_config.image_size
    answers = answer_questions(
        built.model, built.tokenizer, questions, size, max_new_tokens=12, progress=False
    )
    for q in questions.questions:
        reference, text = references[q.id], answers[q.id]["text"]
        cells_right = reference.split(" . ")[0] == text.split(" . ")[0]
        right = final_answer(reference) == final_answer(text)
        row = rows.setdefault(q.family, [0, 0, 0])
        row[0] += 1
        row[1] += cells_right
        row[2] += cells_right and right
    print("| family | cells named right | answer right when the cells are |")
    print("|---|---|---|")
    for family, (total, cells, both) in sorted(rows.items()):
        print(
            f"| {family} | {100 * cells / total:.1f} % ({cells}/{total}) | {100 * both / max(cells, 1):.1f} % |"
        )


def black_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def shuffle_tokens(module, inputs, output):
    """Forward hook on the projector: permute each image's visual tokens (B, N, H) at random."""
    order = torch.argsort(torch.rand(output.shape[:2], generator=torch.Generator().manual_seed(0)), dim=1)
    return torch.gather(output, 1, order.unsqueeze(-1).expand_as(output))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", default=resolve_base("tiny-llava"))
    parser.add_argument("--checkpoint", help="a periodic checkpoint folder of the run (RUN/ckpt/...)")
    parser.add_argument(
        "--images",
        type=int,
        default=500,
        help=f"test images ({len(FAMILIES)} questions each, one per family)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", action="store_true", help="score the named cells too (with the image)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for variant in args.variants.split(","):
        built, data = load(args.source, args.checkpoint, pooled=variant == "pooled 4x")
        test = synthetic_questions(split_shards(data, "test"), args.images)
        size = built.hf.config.vision_config.image_size
        questions = test
        if variant == "blank":
            png = black_png(size)
            questions = QuestionSet(test.questions, lambda key, png=png: png, answer_of=test.answer_of)
        hook = built.model.projector.register_forward_hook(shuffle_tokens) if variant == "shuffled" else None
        started = time.time()
        answers = answer_questions(built.model, built.tokenizer, questions, size, progress=False)
        if hook:
            hook.remove()
        rows[variant] = score(questions, answers) | {"seconds": round(time.time() - started, 1)}
    prior = answer_prior(test)
    families = list(prior)
    if args.cells:
        built, data = load(args.source, args.checkpoint, pooled=False)
        print_cells(built, split_shards(data, "test"), args.images)
    print(f"{len(test.questions)} questions on {args.images} test images of {args.source}")
    print("| | mean | " + " | ".join(families) + " |")
    print("|---" * (len(families) + 2) + "|")
    for variant, row in rows.items():
        cells = [f"{100 * row['per_family'][f]:.1f} %" for f in families]
        print(f"| {variant} | {100 * row['accuracy']:.1f} % | " + " | ".join(cells) + " |")
    print(
        f"| answer prior | {100 * mean_prior(prior):.1f} % | "
        + " | ".join(f"{100 * prior[f]:.1f} %" for f in families)
        + " |"
    )
    print(
        json.dumps(
            {"prior": prior, **{v: {k: r[k] for k in ("accuracy", "per_family")} for v, r in rows.items()}}
        )
    )


if __name__ == "__main__":
    main()
