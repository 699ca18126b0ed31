"""Synthetic generator, shards, dataset/collate and the LLaVA-JSON converter."""

import io
import json
import random

import pytest
import torch
from PIL import Image

from data.convert import convert_llava_json
from data.dataset import ConversationDataset, Skipped, collate
from data.shards import ShardIndex
from data.synth import (
    ASKED,
    COLOURS,
    Scene,
    askable,
    final_answer,
    make_sample,
    questions,
    random_scene,
    region_targets,
    side_of,
    where,
)
from data.templates import get_template


def test_generator_is_deterministic_and_splits_disjoint():
    a, b = make_sample("train", 7, 0, 64, 4), make_sample("train", 7, 0, 64, 4)
    assert a["conversations"] == b["conversations"] and a["image"].tobytes() == b["image"].tobytes()
    scenes = {
        split: {json.dumps(make_sample(split, i, 0, 64, 4)["scene"]) for i in range(150)}
        for split in ("train", "test")
    }
    assert not scenes["train"] & scenes["test"]
    assert all(Scene.from_json(json.loads(s)).split() == "test" for s in scenes["test"])


def test_training_turns_do_not_give_each_other_away():
    """Scored questions come before the training-only lookups (which name every object's cell
    and side), any family can open a conversation (held-out questions are asked alone), and
    after the first turn the questions whose answers name cells (count, detail) come last."""
    firsts = set()
    for index in range(200):
        families = make_sample("train", index, 0, 64, 4)["families"]
        firsts.add(families[0])
        lookups = [i for i, f in enumerate(families) if f in ("where", "cell")]
        assert lookups == list(range(len(families) - len(lookups), len(families)))
        scored = families[1 : len(families) - len(lookups)]
        naming = [f in ("count", "detail") for f in scored]
        assert naming == sorted(naming), families
    assert firsts == {"colour", "shape", "count", "exist", "detail"}


def test_answers_follow_the_scene():
    """Count and detail answers name the cells of exactly the objects involved, then the right
    answer; colour, shape and exist answer straight away, and the training-only `where`
    names both sides of the object."""
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        scene = random_scene(rng, 4)
        if not askable(scene):
            continue
        asked = questions(scene, rng, every_object=True)
        only_shape = [o for o in scene.objects if [p.shape for p in scene.objects].count(o.shape) == 1]
        assert [f for f, _, _ in asked].count("colour") == len(only_shape) > 0
        for family, question, answer in asked:
            cells, final = (
                (answer.split(" . ")[0].split(), final_answer(answer)) if " . " in answer else ([], answer)
            )
            seen.add((family, final) if family == "exist" else family)
            if family == "colour":  # "What colour is the circle?": the only circle
                shape = question.split()[-1].rstrip("?")
                match = [o for o in scene.objects if o.shape == shape]
                assert len(match) == 1 and cells == [] and final == match[0].colour
            if family == "shape":  # "What shape is the red object?": the only red object
                match = [o for o in scene.objects if o.colour == question.split()[4]]
                assert len(match) == 1 and cells == [] and final == match[0].shape
            if family == "detail":
                assert cells == [where(scene.dot[0], scene.dot[1])] and final == scene.dot[2]
            if family == "count":
                word = question.split()[2]
                match = [o for o in scene.objects if word in (o.colour, o.shape + "s")]
                assert cells == ([where(o.row, o.col) for o in match] or ["none"])
                assert final == str(len(match))
            if family == "exist":  # "Is there a red object?" / "Is there a circle?"
                value = question.split()[3].rstrip("?")
                present = any(value in (o.colour, o.shape) for o in scene.objects)
                assert cells == [] and final == ("yes" if present else "no")
            if family == "where":  # "Where is the circle?" / "Where is the red object?"
                words = question.rstrip("?").split()
                match = [o for o in scene.objects if words[3] in (o.shape, o.colour)]
                assert len(match) == 1 and cells == []
                col, row = match[0].col, match[0].row
                assert final == f"{('left', 'right')[col >= 2]} {('top', 'bottom')[row >= 2]}"
    assert {("exist", "yes"), ("exist", "no"), "where", "count", "detail", "cell"} <= seen


def test_crowded_scenes_hold_the_objects_asked_for_and_stay_askable():
    """`objects` = (fewest, most) shapes per scene; each scene still has an object that is the only
    one of its shape and one that is the only one of its colour, which colour and shape ask about."""
    counts = set()
    for index in range(40):
        sample = make_sample("test", index, 0, 128, 8, objects=(12, 16))
        scene = Scene.from_json(sample["scene"])
        counts.add(len(scene.objects))
        assert (
            askable(scene)
            and len({(o.row, o.col) for o in scene.objects} | {scene.dot[:2]}) == len(scene.objects) + 1
        )
    assert min(counts) >= 12 and max(counts) <= 16 and len(counts) > 2
    assert {len(make_sample("test", i, 0, 64, 4)["scene"]["objects"]) for i in range(40)} == {3, 4, 5}


def test_match_asks_the_shape_of_the_one_object_of_the_dots_colour():
    """`match` is asked only where named; its scene has exactly one object of the dot's colour and
    the answer is the dot's colour, then that object's shape; the families not named are not asked,
    in training too."""
    shapes_answered = set()
    for split in ("train", "test"):
        for index in range(30):
            sample = make_sample(split, index, 0, 128, 8, objects=(12, 16), families=("match", "count"))
            scene = Scene.from_json(sample["scene"])
            same_colour = [o for o in scene.objects if o.colour == scene.dot[2]]
            assert len(same_colour) == 1
            turns = dict(zip(sample["families"], sample["conversations"][1::2], strict=True))
            assert set(sample["families"]) == {"match", "count"}
            assert turns["match"]["value"] == f"{scene.dot[2]} . {same_colour[0].shape}"
            shapes_answered.add(same_colour[0].shape)
    assert len(shapes_answered) == 3
    # not named, never asked: the default samples have no match question and the same scenes
    default = make_sample("test", 3, 0, 128, 8, families=ASKED)
    assert "match" not in default["families"] and default == make_sample("test", 3, 0, 128, 8) | {
        "image": default["image"]
    }


def test_side_of_an_odd_grid_has_a_middle():
    assert [side_of(i, 3, "col") for i in range(3)] == ["left", "middle", "right"]
    assert [side_of(i, 4, "row") for i in range(4)] == ["top", "top", "bottom", "bottom"]


def test_rendered_dot_has_its_colour():
    sample = make_sample("test", 3, 0, 64, 4)
    row, col, colour = sample["scene"]["dot"]
    centre = (int((col + 0.5) * 16), int((row + 0.5) * 16))
    assert sample["image"].getpixel(centre) == COLOURS[colour]


def test_region_targets_mark_object_cells():
    sample = make_sample("train", 0, 0, 64, 4)
    targets = region_targets(sample["scene"], 8)
    assert len(targets) == 64
    for obj in sample["scene"]["objects"]:
        patch = (2 * obj["row"]) * 8 + 2 * obj["col"]
        assert targets[patch][0] == 1 + list(COLOURS).index(obj["colour"])
        assert targets[patch][4:] == [obj["row"], obj["col"]]


def test_shard_round_trip(synth_dirs):
    index = ShardIndex(synth_dirs / "train")
    assert len(index) == 64
    for i in (0, 31, 63):
        expected = make_sample("train", i, 0, 64, 4)
        record = index.record(i)
        assert record["id"] == expected["id"] and record["conversations"] == expected["conversations"]
        image = Image.open(io.BytesIO(index.image_bytes(i)))
        assert image.tobytes() == expected["image"].tobytes()


class _Samples(torch.utils.data.Dataset):
    """Each sample's raw JSON and image bytes, read through one ShardIndex."""

    def __init__(self, index: ShardIndex):
        self.index = index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.index.record(i), self.index.image_bytes(i)


def test_loader_workers_read_the_same_bytes_as_one_process(synth_dirs):
    """Forked loader workers inherit the shard files the training process opened (it reads
    samples before the loader starts): reads must not share one file position, or a worker
    reads another's bytes (a JSON cut at a block boundary, a JPEG with another's data)."""
    index = ShardIndex(synth_dirs / "train")
    expected = [_Samples(index)[i] for i in range(len(index))]  # opens the file in this process
    loader = torch.utils.data.DataLoader(
        _Samples(index), batch_size=None, num_workers=3, multiprocessing_context="fork"
    )
    for _ in range(10):  # the old shared position garbled a read in most passes
        assert [tuple(sample) for sample in loader] == expected


def test_unreadable_shards_are_refused_by_name(synth_dirs, tmp_path):
    import gzip

    from data.errors import UserError

    good = (synth_dirs / "train" / "shard-000000.tar").read_bytes()
    bad = {"empty": b"", "not a tar": random.Random(0).randbytes(4096), "gzip": gzip.compress(good)}
    for name, content in bad.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "shard-000000.tar").write_bytes(good)
        (folder / "shard-000001.tar").write_bytes(content)
        with pytest.raises(UserError, match="shard-000001.tar") as refused:
            ShardIndex(folder)
        # a gzip-compressed tar would index, but its offsets are not the file's: it must not
        assert ("gzip" in str(refused.value)) == (name == "gzip")


@pytest.mark.parametrize("into", [10, -100])  # into the image of sample 40, or into its tar header
def test_a_shard_cut_short_keeps_the_samples_before_the_cut(synth_dirs, tokenizer, tmp_path, capsys, into):
    whole = ShardIndex(synth_dirs / "train")
    cut_at = whole.entries[40].members["png"][0] + into
    (tmp_path / "shard-000000.tar").write_bytes(
        (synth_dirs / "train" / "shard-000000.tar").read_bytes()[:cut_at]
    )
    cut = ShardIndex(tmp_path)
    warned = capsys.readouterr().err
    assert "ends early" in warned and "41 samples" in warned
    assert len(cut) == 41 and cut.record(39) == whole.record(39)
    dataset = ConversationDataset(cut, tokenizer, "vicuna_v1", 64, 4, 512, 64)
    assert not isinstance(dataset[39], Skipped)
    assert isinstance(dataset[40], Skipped) and dataset[40].id == whole.record(40)["id"]
    ShardIndex(tmp_path)  # said once per process, not at every stage
    assert "ends early" not in capsys.readouterr().err
    ShardIndex(synth_dirs / "train")  # a whole shard ends with its end-of-archive marker
    assert "ends early" not in capsys.readouterr().err


def test_dataset_and_collate(synth_dirs, tokenizer):
    ds = ConversationDataset(ShardIndex(synth_dirs / "train"), tokenizer, "vicuna_v1", 64, 4, 512, 64)
    batch = collate([ds[0], ds[1], Skipped("bad-1", "corrupt")], tokenizer.pad_token_id)
    assert batch["skipped"] == [("bad-1", "corrupt")] and len(batch["ids"]) == 2
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    short = int(lengths.argmin())
    assert (batch["input_ids"][short, int(lengths[short]) :] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, int(lengths[short]) :] == -100).all()


def test_dataset_skips_samples_truncated_to_nothing(synth_dirs, tokenizer):
    ds = ConversationDataset(ShardIndex(synth_dirs / "train"), tokenizer, "vicuna_v1", 64, 4, 80, 64)
    item = ds[0]
    assert isinstance(item, Skipped) and "max_length=80" in item.reason


def test_dataset_keeps_only_the_first_turns_when_asked(synth_dirs, tokenizer):
    shards = ShardIndex(synth_dirs / "train")
    conversations = shards.record(0)["conversations"]
    assert len(conversations) >= 6
    full = ConversationDataset(shards, tokenizer, "vicuna_v1", 64, 4, 512, 64)[0]
    for turns in (1, 2):
        kept = ConversationDataset(shards, tokenizer, "vicuna_v1", 64, 4, 512, 64, turns=turns)[0]
        expected = get_template("vicuna_v1").encode(conversations[: 2 * turns], tokenizer, 4, 512 - 63)
        assert torch.equal(torch.as_tensor(kept["input_ids"]), torch.as_tensor(expected.input_ids))
        assert torch.equal(torch.as_tensor(kept["labels"]), torch.as_tensor(expected.labels))
        assert len(kept["input_ids"]) < len(full["input_ids"])


def test_converter_skips_and_reports_bad_entries(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(images / "good.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (8, 8)).save(images / "trunc.png")
    (images / "trunc.png").write_bytes((images / "trunc.png").read_bytes()[:30])
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "ok-1", "image": "good.png", "conversations": conv},
        {"id": "missing", "image": "nope.png", "conversations": conv},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": conv},
        {"id": "truncated", "image": "trunc.png", "conversations": conv},
        {"id": "roles", "image": "good.png", "conversations": [conv[1], conv[0]]},
        {
            "id": "no-placeholder",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "hi"}, conv[1]],
        },
        "not an object",
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    report = convert_llava_json(tmp_path / "data.json", images, tmp_path / "out", progress=False)
    assert report.written == 2
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [
        "missing",
        "corrupt",
        "truncated",
        "roles",
        "no-placeholder",
        "<entry 6>",
    ]
    index = ShardIndex(tmp_path / "out")
    assert [index.record(i)["id"] for i in range(len(index))] == ["ok-1", "text-only"]
    assert index.image_bytes(1) is None
    assert Image.open(io.BytesIO(index.image_bytes(0))).size == (20, 10)


def test_converter_selects_single_turn_image_samples_and_a_reproducible_fraction(tmp_path):
    from data.convert import Selection

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    one = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    two = one + [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "blue"}]
    text = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    records = [{"id": f"single-{i}", "image": "a.png", "conversations": one} for i in range(40)]
    records += [{"id": f"multi-{i}", "image": "a.png", "conversations": two} for i in range(5)]
    records += [{"id": "text", "conversations": text}]
    (tmp_path / "data.json").write_text(json.dumps(records))

    def converted(selection, out):
        convert_llava_json(
            tmp_path / "data.json", images, tmp_path / out, progress=False, selection=selection
        )
        index = ShardIndex(tmp_path / out)
        return [index.record(i)["id"] for i in range(len(index))]

    assert converted(Selection(single_turn=True, with_image=True), "all") == [
        f"single-{i}" for i in range(40)
    ]
    picked = converted(Selection(True, True, fraction=0.25, seed=1), "quarter")
    assert len(picked) == 10 and all(p.startswith("single-") for p in picked)
    assert picked == sorted(picked, key=lambda p: int(p.split("-")[1]))  # the file's order
    assert converted(Selection(True, True, fraction=0.25, seed=1), "again") == picked
    assert converted(Selection(True, True, fraction=0.25, seed=2), "other") != picked


def test_collate_of_only_skipped_items():
    batch = collate([Skipped("a", "r")], 0)
    assert "input_ids" not in batch and batch["skipped"] == [("a", "r")]
    assert torch.is_tensor(
        collate([{"id": "x", "input_ids": [1], "labels": [1], "pixel_values": None}], 0)["input_ids"]
    )
