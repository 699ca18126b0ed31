"""How often a training conversation gives a scored answer away before the question is asked.

`vtc evaluate` (and `base_probe.py`) ask every held-out question on its own, right after the
image. A training image asks many questions in one conversation, so a turn's answer can already
stand in the conversation's text: `What is at b3?` → `large red circle` names the circle's cell,
and with it the answer to a later `Is the circle on the left or the right?`. A model can learn
such turns by reading the text, a route that held-out questions do not have. This script counts,
over the first `--images` training samples of the language in `data/synth.py` (run it with
`PYTHONPATH` on a patched tree to measure another language), the scored turns whose answer
earlier turns' text already gives:

- spatial: the named object's cell word (`b3`) appears in an earlier turn, or an earlier
  spatial or `Where is …?` turn named the same object and answered its side on the asked axis;
- count: an earlier turn's text names the cell of every object of the scene (so counting the
  matching ones needs no image).

    PYTHONPATH=/tmp/t12 python bench/turn_leaks.py --images 2000
"""

from __future__ import annotations

import argparse
import re

from data import synth


def referent(question: str, scene: synth.Scene) -> synth.SceneObject | None:
    """The object a question names as `the circle` or `the red object` (None if it names none)."""
    match = re.search(r"the (\w+)(?: object)?\b", question)
    if not match:
        return None
    word = match.group(1)
    found = [o for o in scene.objects if word in (o.colour, o.shape)]
    return found[0] if len(found) == 1 else None


def leaks(sample: dict) -> dict[str, list[bool]]:
    """{family: [given away?] per scored turn of that family} for one training sample."""
    scene = synth.Scene.from_json(sample["scene"])
    convs = sample["conversations"]
    cells = {synth.where(o.row, o.col): o for o in scene.objects}
    out: dict[str, list[bool]] = {"spatial": [], "count": []}
    text, sides_told = "", set()  # (object, axis) whose side an earlier answer gave
    for turn, family in enumerate(sample["families"]):
        question, answer = convs[2 * turn]["value"].replace("<image>\n", ""), convs[2 * turn + 1]["value"]
        said = set(re.findall(r"\b[a-h][1-8]\b", text))
        target = referent(question, scene)
        if family == "spatial":
            axis = "col" if "left" in question else "row"
            named = target is not None and synth.where(target.row, target.col) in said
            out["spatial"].append(named or (target, axis) in sides_told)
        elif family == "count":
            out["count"].append(set(cells) <= said)
        if family in ("spatial", "where") and target is not None:
            axes = ["col", "row"] if family == "where" else ["col" if "left" in question else "row"]
            sides_told.update((target, axis) for axis in axes)
        text += f" {question} {answer}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    totals: dict[str, list[bool]] = {"spatial": [], "count": []}
    for index in range(args.images):
        sample = synth.make_sample("train", index, args.seed, 64, 4)
        for family, flags in leaks(sample).items():
            totals[family] += flags
    print(f"data/synth.py VERSION {synth.VERSION}, {args.images} training images")
    for family, flags in totals.items():
        if flags:
            share = sum(flags) / len(flags)
            print(f"  {family:8s} {len(flags):6d} turns, answer given away by earlier text: {share:6.1%}")


if __name__ == "__main__":
    main()
