"""Where does a base's spatial answer go wrong: in finding the object, or in reading its half?

For the spatial question of each test image (`Is the circle on the left or the right?`) and,
as a control, its colour question (`What colour is the circle?`, same lookup, a different
readout), this prints:

- accuracy, per axis (left/right, top/bottom), per right answer (a bias towards one side, e.g.
  the option the question names last, shows there) and per way the object is named;
- per layer, the share of the last prompt token's attention to the visual tokens that lands on
  the named object's cell (its 2×2 patches on the tiny base; summed over heads), for right and
  for wrong answers: low on wrong answers = the object was not found;
- per layer, how often the logit lens (that layer's hidden state through the final norm and the
  LM head) already ranks the right side above the other: where the readout happens.

    python bench/spatial_attention.py [SOURCE] [--checkpoint CKPT_DIR] [--images 200] [--where]

`--where` also asks the training-only `Where is the circle?` (→ `left bottom`: the object named
last, as colour questions name it) of every nameable object, and scores each side.

SOURCE as in base_probe.py (default: the shipped base). It reads the language of tries 10–12,
whose spatial questions name one object (`git apply bench/try12-synth.patch`, then train or
point it at such a run); the shipped language's `Is the red circle left of the blue square?`
names two, and is refused. Prints measured figures only.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from base_probe import load  # a sibling bench

from data.dataset import load_views
from data.templates import get_template
from models.compressors.base import Compressor
from train.accuracy import Question, QuestionSet, answer_questions, questions_of
from train.datamodule import split_shards
from train.recipe import resolve_base

SIDES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def target_of(question: str, scene: dict) -> dict | None:
    """The scene object a colour or spatial question names (`the circle`, `the red object`)."""
    words = question.rstrip("?").split()
    named = words[words.index("the") + 1]
    for obj in scene["objects"]:
        if named in (obj["shape"], obj["colour"]):
            return obj
    return None


def object_patches(obj: dict, grid: int, patch_grid: int) -> list[int]:
    """Raster indices of the patches covering the object's cell."""
    per = patch_grid // grid
    return [
        (obj["row"] * per + r) * patch_grid + obj["col"] * per + c for r in range(per) for c in range(per)
    ]


class LastTokenAttention:
    """Asks `LanguageModel.run` for the last prompt token's attention at every layer (the
    mechanism in-LLM components read attention through); changes nothing."""

    attention_queries = Compressor.attention_queries  # each sample's last prompt token
    read_attention = Compressor.read_attention

    def __init__(self, layers: int):
        self.attention_layers = tuple(range(layers))

    def before_layer(self, layer_idx: int, state):
        return state


@torch.no_grad()
def trace(model, prompt: list[int], pixels: torch.Tensor, patches: list[int]):
    """(per-layer share of the last token's visual attention on `patches`, per-layer logits of
    the last position through the final norm + LM head (layers, vocab))."""
    ids = torch.tensor([prompt])
    state = model.prepare(ids, torch.ones_like(ids), pixels[None])
    llm = model.llm
    visual = state.visual_mask[0].nonzero().flatten()
    on_object = visual[patches]
    probe = LastTokenAttention(llm.num_layers)
    shares, lens = [], []
    for idx in range(llm.num_layers):
        state = llm.run(state, [probe], start=idx, stop=idx + 1)
        probs = probe.read_attention(state).probs[0, :, 0]  # (heads, T), of the layer's input
        shares.append(float(probs[:, on_object].sum() / probs[:, visual].sum()))
        last = state.hidden[0, -1]  # run() norms the output of the final layer itself
        lens.append(llm.lm_head(last if idx == llm.num_layers - 1 else llm.body.norm(last)))
    return shares, torch.stack(lens)


def where_questions(built, shards, images: int) -> None:
    """Side accuracy of `Where is X?` for every object a spatial question can name."""
    from data.synth import Scene, SceneObject, _referents, side_of  # the try-12 language only

    questions, sides = [], {}
    for index in range(min(images, len(shards))):
        scene = shards.record(index)["scene"]
        objects = [SceneObject(**o) for o in scene["objects"]]
        parsed = Scene(grid=scene["grid"], objects=objects, dot=tuple(scene["dot"]))
        for turn, (phrase, obj) in enumerate(_referents(parsed)):
            qid = f"{index}-{turn}"
            questions.append(Question(qid, str(index), "where", f"Where is {phrase}?", ("",)))
            sides[qid] = (side_of(obj.col, scene["grid"], "col"), side_of(obj.row, scene["grid"], "row"))
    size = built.hf.config.vision_config.image_size
    qset = QuestionSet(questions, lambda key: shards.image_bytes(int(key)))
    answers = answer_questions(built.model, built.tokenizer, qset, size, progress=False)
    column = row = 0
    for q in questions:
        words = answers[q.id]["text"].split() + ["", ""]
        column += words[0] == sides[q.id][0]
        row += words[1] == sides[q.id][1]
    n = len(questions)
    print(
        f"\n`Where is X?`, {n} questions: column side {100 * column / n:.1f} %, row side {100 * row / n:.1f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", default=resolve_base("tiny-llava"))
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--where", action="store_true", help="also score `Where is X?` questions")
    args = parser.parse_args()
    torch.set_num_threads(2)
    built, data = load(args.source, args.checkpoint, pooled=False)
    model, tok = built.model.eval(), built.tokenizer
    size = built.hf.config.vision_config.image_size
    patch_grid = size // built.hf.config.vision_config.patch_size
    tmpl = get_template("vicuna_v1")
    shards = split_shards(data, "test")
    right = defaultdict(list)  # (family, split key) -> [bool]
    shares = defaultdict(list)  # (family, right?) -> [per-layer shares]
    lens_right = defaultdict(list)  # family -> [per-layer bool]
    for index in range(min(args.images, len(shards))):
        record = shards.record(index)
        scene = record["scene"]
        pixels, _ = load_views(shards.image_bytes(index), size)
        for family, question, answer in questions_of(record):
            if family not in ("spatial", "colour"):
                continue
            if family == "spatial" and " or the " not in question:
                raise SystemExit(f"{question!r}: not a one-object spatial question (see --help)")
            obj = target_of(question, scene)
            prompt = tmpl.prompt("<image>\n" + question, tok, model.image_token_id)
            layer_shares, lens = trace(model, prompt, pixels, object_patches(obj, scene["grid"], patch_grid))
            answer_id = tok.convert_tokens_to_ids(answer)
            ok = int(lens[-1].argmax()) == answer_id
            named = "shape" if obj["shape"] in question else "colour"
            right[(family, "all")].append(ok)
            right[(family, f"named by {named}")].append(ok)
            if family == "spatial":
                axis = "left/right" if "left" in question else "top/bottom"
                right[(family, axis)].append(ok)
                right[(family, f"answer {answer}")].append(ok)
                other = tok.convert_tokens_to_ids(SIDES[answer])
                lens_right[family].append([bool(v[answer_id] > v[other]) for v in lens])
            shares[(family, ok)].append(layer_shares)
    print(f"{args.source} {args.checkpoint or ''}: {min(args.images, len(shards))} test images")
    print("| family | questions | accuracy (first answer token) |\n|---|---|---|")
    for (family, key), oks in sorted(right.items()):
        print(f"| {family}, {key} | {len(oks)} | {100 * sum(oks) / len(oks):.1f} % |")
    layers = len(model.llm.body.layers)
    print("\nshare of the last token's visual attention on the named object's cell, mean per layer")
    print("| family | answers | n | " + " | ".join(f"layer {i}" for i in range(layers)) + " |")
    print("|---|---|---|" + "---|" * layers)
    for (family, ok), rows in sorted(shares.items()):
        means = [statistics.mean(r[i] for r in rows) for i in range(layers)]
        print(
            f"| {family} | {'right' if ok else 'wrong'} | {len(rows)} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + " |"
        )
    chance = len(object_patches({"row": 0, "col": 0}, 4, patch_grid)) / patch_grid**2
    print(f"(uniform attention would put {chance:.2f} there)")
    rows = lens_right["spatial"]
    print("\nspatial: logit lens ranks the right side above the other, per layer")
    print(" | ".join(f"layer {i}: {100 * sum(r[i] for r in rows) / len(rows):.1f} %" for i in range(layers)))
    if args.where:
        where_questions(built, shards, args.images)


if __name__ == "__main__":
    main()
