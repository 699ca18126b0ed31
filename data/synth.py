"""Synthetic visual question answering (Sort-of-CLEVR-like), deterministic per seed.

A scene is a G×G grid of cells; a few cells hold a coloured shape (large or small) and one empty
cell holds a small coloured dot. A cell is named by one word, its column letter and row number
(`b3`: column b, row 3), so that locating a cell is one token's lookup. Every image comes with a
caption that lists every object (dense supervision for alignment) and questions of five families:

- `colour`: the colour of the only object of a shape (`What colour is the circle?`)
- `shape`: the shape of the only object of a colour (`What shape is the red object?`)
- `count`:   how many objects of a colour (or shape) there are
- `exist`:   whether an object of a colour (or a shape) is present (half yes, half no)
- `detail`:  the colour of the small dot, which pooling several patches together blurs

and, only where a recipe asks for it (`data.synthetic.families`), a sixth:

- `match`: the shape of the one object that has the dot's colour (`What shape is the dot
  object?` → `red . circle`: the dot's colour first, as grounded answers name their cells first),
  which rests on two places at once, the dot and that object; on a multi-view image they are
  mostly in different crops, so a crop that keeps few tokens must know what another crop shows to
  know which of its objects to keep

Count is the family that relates objects to each other. An earlier `spatial` family (which half
of the image an object is in, or whether one object is left of another) is gone: in every form
tried the tiny base stayed near 70 % held out, 54 % with a black image (bench/README.md).

Count and detail answers first name the cells they rest on, then answer (**grounded answers**:
`How many red objects are there?` → `a1 c3 . 2`, `What colour is the dot?` → `c2 . red`); the
cells are intermediate supervision without which count sits at its answer prior for thousands of
steps (bench/README.md). Colour, shape and exist are answered straight away (`What colour is the
circle?` → `red`, `Is there a circle?` → `yes`): each asks for something the object itself shows. Questions name objects by what they are, never by their cell: a fresh tiny LLM
learns to find "the circle" far sooner than "the object at b3". The answer that is scored is the
word after the last ` . ` (`final_answer`). Training images also ask `What is at b3?` and
`Where is the circle?` (`left bottom`), not scored: naming a cell's content and an object's place
teaches which cell each word names, which count's cells need.

Splits are disjoint by construction: a scene belongs to the split chosen by a hash of its
content, and each split's generator rejects scenes of the others.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("large", "small")
FAMILIES = ("colour", "shape", "count", "exist", "detail")
EXTRA_FAMILIES = ("match",)  # scored, but asked only where a recipe names them
TRAINING_ONLY = ("where", "cell")  # lookups asked of training images only, never scored
ASKED = FAMILIES + TRAINING_ONLY  # what a sample asks unless a recipe names its families
SPLITS = ("train", "val", "test")
_SPLIT_BUCKETS = {"test": range(0, 1), "val": range(1, 2), "train": range(2, 20)}
# Bumped whenever the generator's output changes, so caches of an older language are not reused.
VERSION = 12
COLUMNS = "abcdefgh"  # a grid has at most 8 columns and rows
ANSWER_SEPARATOR = " . "  # between a grounded answer's cells and its final answer


@dataclass(frozen=True)
class SceneObject:
    row: int
    col: int
    colour: str
    shape: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    grid: int
    objects: tuple[SceneObject, ...]
    dot: tuple[int, int, str]  # row, col, colour

    def to_json(self) -> dict:
        return {"grid": self.grid, "objects": [asdict(o) for o in self.objects], "dot": list(self.dot)}

    @staticmethod
    def from_json(d: dict) -> Scene:
        objects = tuple(SceneObject(**o) for o in d["objects"])
        return Scene(d["grid"], objects, tuple(d["dot"]))

    def split(self) -> str:
        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).digest()
        bucket = digest[0] % 20
        return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)


OBJECTS = (3, 5)  # fewest and most shapes per scene, by default


def crowd_problem(objects: tuple[int, int], grid: int) -> str | None:
    """Why a `grid`×`grid` scene cannot hold `objects` = (fewest, most) shapes, or None."""
    fewest, most = objects
    if fewest > most:
        return f"fewest {fewest} is more than most {most}"
    if most + 1 > grid * grid:  # every shape and the dot take a cell of their own
        return f"{most} shapes and the dot need {most + 1} cells; a {grid}×{grid} grid has {grid * grid}"
    return None


def families_problem(families: tuple[str, ...]) -> str | None:
    """Why samples asked `families` cannot be scored (no scored family: test images ask only
    those), or None."""
    if set(families) - set(TRAINING_ONLY):
        return None
    return f"name at least one scored family ({', '.join(FAMILIES + EXTRA_FAMILIES)}); test images ask only those"


def random_scene(
    rng: random.Random, grid: int, min_objects: int = OBJECTS[0], max_objects: int = OBJECTS[1]
) -> Scene:
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], max_objects + 1)
    count = rng.randint(min_objects, max_objects)
    objects = tuple(
        SceneObject(r, c, rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES))
        for r, c in sorted(cells[:count])
    )
    dot_row, dot_col = cells[count]
    return Scene(grid, objects, (dot_row, dot_col, rng.choice(list(COLOURS))))


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene on a black square image of `image_size` pixels."""
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cell = image_size / scene.grid
    for obj in scene.objects:
        half = cell * (0.42 if obj.size == "large" else 0.22)
        cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    row, col, colour = scene.dot
    r = max(1.0, cell * 0.1)
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    draw.rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=COLOURS[colour])
    return image


def where(row: int, col: int) -> str:
    """How captions, questions and answers name a cell: one word, column letter then row number."""
    return f"{COLUMNS[col]}{row + 1}"


def grounded(cells: list[str], answer: str) -> str:
    """An answer that first names the cells it rests on (`none` if no object matches)."""
    return " ".join(cells or ["none"]) + ANSWER_SEPARATOR + answer


def final_answer(text: str) -> str:
    """The scored part of an answer: what follows the last ` . ` (the whole text if none)."""
    return text.rsplit(ANSWER_SEPARATOR.strip(), 1)[-1].strip()


def _what(scene: Scene) -> dict[tuple[int, int], str]:
    """What each cell holds, in words: `large red circle`, `red dot` or `empty`."""
    dot_row, dot_col, dot_colour = scene.dot
    out = {(r, c): "empty" for r in range(scene.grid) for c in range(scene.grid)}
    out[(dot_row, dot_col)] = f"{dot_colour} dot"
    out.update({(o.row, o.col): f"{o.size} {o.colour} {o.shape}" for o in scene.objects})
    return out


def _cell_contents(scene: Scene, rng: random.Random, empty: int = 2) -> list[tuple[str, str]]:
    """(cell, what it holds) for every object, the dot and `empty` empty cells."""
    what = _what(scene)
    empties = [cell for cell, w in what.items() if w == "empty"]
    chosen = [cell for cell, w in what.items() if w != "empty"] + rng.sample(empties, empty)
    return [(where(*cell), what[cell]) for cell in chosen]


def caption(scene: Scene) -> str:
    """Dense targets for the alignment stage, in two halves:

    - every cell in raster order, its name then what it holds (`a1 empty ; b1 large red circle ;
      c1 red dot ; ...`): what each part of the image shows, in words;
    - every colour, then every shape, with the cells of the objects that have it (`red b1 c3 ;
      green none ; ... circle b1 ; ...`): where things are, what grounded answers name.
    """
    what = _what(scene)
    cells = [
        f"{where(row, col)} {what[(row, col)]}" for row in range(scene.grid) for col in range(scene.grid)
    ]
    groups = [
        f"{value} " + " ".join(_cells([o for o in scene.objects if value in (o.colour, o.shape)]) or ["none"])
        for value in (*COLOURS, *SHAPES)
    ]
    return " ; ".join(cells) + " . " + " ; ".join(groups) + " ."


def _only_one(scene: Scene, attribute: str) -> list[SceneObject]:
    """The objects that are the only one of their `attribute` ("shape": the only circle)."""
    values = [getattr(o, attribute) for o in scene.objects]
    return [o for o in scene.objects if values.count(getattr(o, attribute)) == 1]


def dot_match(scene: Scene) -> list[SceneObject]:
    """The objects that have the dot's colour."""
    return [o for o in scene.objects if o.colour == scene.dot[2]]


def askable(scene: Scene, families: tuple[str, ...] = ASKED) -> bool:
    """Whether every family of `families` has a question about `scene`. Colour questions name an
    object by its shape and shape questions by its colour (and `where` either way), so they need
    an object that is the only one of its shape and one that is the only one of its colour;
    `match` needs exactly one object of the dot's colour."""
    if {"colour", "shape", "where"} & set(families) and not (
        _only_one(scene, "shape") and _only_one(scene, "colour")
    ):
        return False
    return "match" not in families or len(dot_match(scene)) == 1


def questions(
    scene: Scene, rng: random.Random, every_object: bool = False, families: tuple[str, ...] = ASKED
) -> list[tuple[str, str, str]]:
    """(family, question, answer) triples of the families in `families`: one per scored family,
    or with `every_object` (dense supervision for training) the colour of every object that is
    the only one of its shape, the shape of every object that is the only one of its colour,
    `TRAIN_REPEATS` distinct questions of count and exist, one detail, one match, and `cell`
    questions (`What is at b3?` → `large red circle`, training only) for every object, the dot
    and two empty cells."""
    out = []
    by_shape, by_colour = _only_one(scene, "shape"), _only_one(scene, "colour")
    if "colour" in families:
        for target in by_shape if every_object else [rng.choice(by_shape)]:
            out.append(("colour", f"What colour is the {target.shape}?", target.colour))
    if "shape" in families:
        for target in by_colour if every_object else [rng.choice(by_colour)]:
            out.append(("shape", f"What shape is the {target.colour} object?", target.shape))
    if every_object and "cell" in families:  # training only: which cell each word names
        for cell, what in _cell_contents(scene, rng):
            out.append(("cell", f"What is at {cell}?", what))
    if every_object and "where" in families:  # training only: both sides of every named object
        for phrase, target in _referents(scene):
            sides = [side_of(getattr(target, axis), scene.grid, axis) for axis in SIDES]
            out.append(("where", f"Where is {phrase}?", " ".join(sides)))
    for family in ("count", "exist"):
        if family not in families:
            continue
        asked: set[str] = set()
        wanted = TRAIN_REPEATS if every_object else 1
        for _ in range(3 * wanted):  # draws until `wanted` distinct questions (or give up)
            triple = _ASK[family](scene, rng)
            if triple[1] not in asked:
                asked.add(triple[1])
                out.append(triple)
            if len(asked) == wanted:
                break
    row, col, colour = scene.dot
    if "detail" in families:
        out.append(("detail", "What colour is the dot?", grounded([where(row, col)], colour)))
    if "match" in families:  # "the dot object": the object of the dot's colour, one by askable
        # (the plain answer, its shape alone, stayed at chance for 450 steps: bench/README.md)
        out.append(
            (
                "match",
                "What shape is the dot object?",
                f"{colour}{ANSWER_SEPARATOR}{dot_match(scene)[0].shape}",
            )
        )
    return out


TRAIN_REPEATS = 4
# Training conversations ask the scored families first, in a random order, and the training-only
# lookups after them. Evaluation asks every question on its own, so a training turn whose answer
# an earlier turn's text gives away (`What is at b3?` → `large red circle` before `How many
# circles are there?` → `b3 . 1`) teaches reading the conversation instead of the image; the
# lookups name every object's cell and side. (Scored families in a fixed order instead would teach the
# first turn's format: a first question is then always of one family.)
NAME_CELLS = ("count", "detail")  # grounded answers: they name cells


def _cells(objs) -> list[str]:
    return [where(o.row, o.col) for o in objs]


def _count(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        colour = rng.choice(list(COLOURS))
        matches = [o for o in scene.objects if o.colour == colour]
        question = f"How many {colour} objects are there?"
    else:
        shape = rng.choice(SHAPES)
        matches = [o for o in scene.objects if o.shape == shape]
        question = f"How many {shape}s are there?"
    return ("count", question, grounded(_cells(matches), str(len(matches))))


def _exist(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """Is there an object of a colour (or of a shape)? Half yes, half no where the scene allows,
    answered straight away: a presence check, the attention count's questions already learn."""
    by_colour = rng.random() < 0.5
    values = list(COLOURS) if by_colour else list(SHAPES)
    present = sorted({o.colour if by_colour else o.shape for o in scene.objects})
    absent = [v for v in values if v not in present]
    value = rng.choice(present if rng.random() < 0.5 or not absent else absent)
    phrase = f"a {value} object" if by_colour else f"a {value}"
    return ("exist", f"Is there {phrase}?", "yes" if value in present else "no")


SIDES = {"col": ("left", "right"), "row": ("top", "bottom")}


def _referents(scene: Scene) -> list[tuple[str, SceneObject]]:
    """(phrase, object) for every object a question can name by what it is: `the circle` (the
    only circle), `the red object` (the only red one)."""
    referents = [(f"the {o.shape}", o) for o in _only_one(scene, "shape")]
    return referents + [(f"the {o.colour} object", o) for o in _only_one(scene, "colour")]


def side_of(index: int, grid: int, axis: str) -> str:
    """Which half of the image a cell's row or column index lies in (`middle` for the centre
    row or column of an odd grid)."""
    middle = (grid - 1) / 2
    if index == middle:
        return "middle"
    return SIDES[axis][index > middle]


_ASK = {"count": _count, "exist": _exist}


def vocabulary_corpus() -> list[str]:
    """Every word the generator can produce, for building the tiny tokenizer."""
    words = list(COLOURS) + list(SHAPES) + [f"{s}s" for s in SHAPES] + list(SIZES)
    words += [f"{c}{r}" for c in COLUMNS for r in range(1, len(COLUMNS) + 1)]
    words += [str(i) for i in range(10)] + ["yes", "no", "none", "empty", "dot", "objects"]
    words += [
        "What colour is the ?",
        "What is at ?",
        "What shape is the object ?",
        "How many are there ?",
        "Is there a object ?",
        "Is the on left or right at top bottom middle ?",  # `where` answers (and the old spatial)
        "Where is ?",
        " ; .\n",
    ]
    return words


def make_sample(
    split: str,
    index: int,
    seed: int,
    image_size: int,
    grid: int,
    objects: tuple[int, int] = OBJECTS,
    families: tuple[str, ...] = ASKED,
) -> dict:
    """Sample `index` of `split`: {id, image (PIL), conversations, scene, families, caption}, its
    scene holding `objects` = (fewest, most) shapes, asked the question kinds in `families`.
    Training samples ask about every object; val/test ask one question per scored family."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    rng = random.Random(f"{seed}/{split}/{index}")
    scene = random_scene(rng, grid, *objects)
    while scene.split() != split or not askable(scene, families):
        scene = random_scene(rng, grid, *objects)
    qa = questions(scene, rng, every_object=split == "train", families=families)
    rng.shuffle(qa)
    qa.sort(key=lambda triple: triple[0] in TRAINING_ONLY)  # stable: scored turns first, shuffled
    # after the first turn (any family, as held-out questions are), questions that name cells
    # come after the ones a cell gives away
    scored = len([t for t in qa if t[0] not in TRAINING_ONLY])
    qa[1:scored] = sorted(qa[1:scored], key=lambda triple: triple[0] in NAME_CELLS)
    conversations = []
    for turn, (_, question, answer) in enumerate(qa):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {
        "id": f"synth-{split}-{seed}-{index:07d}",
        "image": render(scene, image_size),
        "conversations": conversations,
        "caption": caption(scene),
        "families": [family for family, _, _ in qa],
        "scene": scene.to_json(),
    }


def region_targets(scene: dict, patch_grid: int) -> list[list[int]]:
    """Per-patch targets for dense vision pretraining, raster order over a patch_grid² map:
    [colour, shape, size, dot colour, row, column] of the cell holding the patch (0 = nothing).
    `scene` is `Scene.to_json()`; patch_grid must be a multiple of the scene grid."""
    grid = scene["grid"]
    if patch_grid % grid:
        raise ValueError(f"patch grid {patch_grid} is not a multiple of the scene grid {grid}")
    colours, per_cell = list(COLOURS), patch_grid // grid
    cells = {(o["row"], o["col"]): o for o in scene["objects"]}
    dot_row, dot_col, dot_colour = scene["dot"]
    targets = []
    for py in range(patch_grid):
        for px in range(patch_grid):
            cell = (py // per_cell, px // per_cell)
            obj = cells.get(cell)
            row = [0, 0, 0, 0, cell[0], cell[1]]
            if obj:
                row[:3] = [
                    1 + colours.index(obj["colour"]),
                    1 + SHAPES.index(obj["shape"]),
                    1 + SIZES.index(obj["size"]),
                ]
            if cell == (dot_row, dot_col):
                row[3] = 1 + colours.index(dot_colour)
            targets.append(row)
    return targets


def region_classes(grid: int) -> tuple[int, ...]:
    """Number of classes of each region_targets column for a scene grid of `grid` cells."""
    return (1 + len(COLOURS), 1 + len(SHAPES), 1 + len(SIZES), 1 + len(COLOURS), grid, grid)


def write_synthetic(
    out_dir,
    split: str,
    samples: int,
    seed: int = 0,
    image_size: int = 64,
    grid: int = 4,
    samples_per_shard: int = 5000,
    progress: bool = True,
    objects: tuple[int, int] = OBJECTS,
    families: tuple[str, ...] = ASKED,
) -> int:
    """Generate `samples` samples of `split` into webdataset shards under `out_dir`; each scene
    holds `objects` = (fewest, most) shapes and is asked the question kinds in `families`."""
    from tqdm import tqdm

    from data.shards import ShardWriter, encode_png

    with ShardWriter(out_dir, samples_per_shard) as writer:
        for index in tqdm(range(samples), desc=f"synth {split}", disable=not progress, unit="img"):
            sample = make_sample(split, index, seed, image_size, grid, objects, families)
            image = sample.pop("image")
            writer.write(sample, encode_png(image))
    return samples
