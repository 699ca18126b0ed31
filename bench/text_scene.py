"""Is the tiny base's wall in the LLM alone? Train a fresh tiny Llama (the tiny base's LLM shape)
on the synthetic questions with the scene given as words instead of an image, and score the
held-out questions of each family.

Each item is the scene's caption, then one of its questions (`<s>{caption} {question}` → answer):

    <s>a1 empty ; b1 large red circle ; ... ; d2 green dot ; ... ; h8 empty . red b1 ; ... ;
       circle b1 ; square a3 . Is there a red square?  →  no

No vision tower and no projector: the question's words and the scene's words are the same
tokens, so whatever the LLM must learn is the matching itself (a cell's name for colour and
shape, a colour *and* a shape for exist, a number of matches for count). A step is cheap (no
visual tokens), so this runs many more steps than the image benches.

The samples are vtc's own (`data.synth.make_sample` with the default recipe's `data.synthetic`:
the same images, splits and wording as `vtc train`). Batches are drawn from every question of the
chosen families of the first `--images` training images (the colour and shape of every object and
one question of each other family: the instruction stage's mixture); the held-out score asks every
test image its question of each family (first answer token). `--llm-width/--llm-heads/--llm-layers`
change the fresh LLM's shape (default: the tiny base's).

    python bench/text_scene.py [--families colour,shape,count,exist,detail] [--steps 1500]
"""

from __future__ import annotations

import argparse

import family_loop as loop  # a sibling bench
import torch
from lookup import llm_shape
from transformers import LlamaForCausalLM

from data.synth import FAMILIES, make_sample
from models.tiny import tiny_llava_config, tiny_tokenizer
from train.accuracy import questions_of
from train.recipe import DEFAULT_RECIPE, load_recipe


def scene_questions(split: str, count: int, synthetic) -> list[tuple[str, str, str, str]]:
    """(family, caption, question, answer) of every question of the first `count` images that
    `vtc train` generates with the recipe's `data.synthetic` settings."""
    out = []
    for index in range(count):
        sample = make_sample(split, index, synthetic.seed, synthetic.image_size, synthetic.grid)
        out += [(family, sample["caption"], q, a) for family, q, a in questions_of(sample)]
    return out


def encode(items, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, L), their attention mask and position ids, and the answers' first
    token (B,): the answer is predicted at the last position of every row."""
    prompts = [
        [tokenizer.bos_token_id, *tokenizer(f"{caption} {question}", add_special_tokens=False).input_ids]
        for _, caption, question, _ in items
    ]
    return *loop.left_padded(prompts, tokenizer.pad_token_id), loop.first_answer_tokens(items, tokenizer)


def last_logits(model, items, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, positions, answers = encode(items, tokenizer)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    return logits[:, -1], answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"of {', '.join(FAMILIES)}")
    parser.add_argument(
        "--images", type=int, default=8000, help="training images (their questions are drawn)"
    )
    loop.add_loop_arguments(
        parser, steps=1500, eval_every=250, seed_help="the fresh LLM's weights and batch order"
    )
    args = parser.parse_args()
    families = loop.start(args, FAMILIES)

    tokenizer = tiny_tokenizer()
    model = LlamaForCausalLM(tiny_llava_config(llm_shape(args), tokenizer).text_config)
    synthetic = load_recipe(DEFAULT_RECIPE, check_machine=False).data.synthetic
    train = [q for q in scene_questions("train", args.images, synthetic) if q[0] in families]
    test = [q for q in scene_questions("test", args.test_images, synthetic) if q[0] in families]
    curve = loop.train_and_score(
        model,
        lambda items: last_logits(model, items, tokenizer),
        lambda rng: rng.choices(train, k=args.batch),
        test,
        families,
        args,
    )
    title = f"held-out accuracy, scene given as words ({args.test_images} test images, batch {args.batch})"
    loop.print_curve(title, curve, test, families)


if __name__ == "__main__":
    main()
