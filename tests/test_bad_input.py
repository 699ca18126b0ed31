"""Bad input, as a careless user gives it: broken data entries and files, a conversion into a
folder that holds shards, CLI misuse. Each gets a one-line error naming the file, option or
sample id, or a documented skip — never a traceback, never half-written output."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from data.convert import convert_llava_json
from data.dataset import ConversationDataset, Skipped
from data.shards import ShardIndex, ShardWriter, encode_png
from train.cli import main

QUESTION = {"from": "human", "value": "<image>\nWhat is it?"}
ANSWER = {"from": "gpt", "value": "red"}
CONV = [QUESTION, ANSWER]

# (id, entry, the kind of reason it is skipped for)
BROKEN_ENTRIES = [
    (
        "turn-not-object",
        {"id": "turn-not-object", "image": "good.png", "conversations": ["hi", ANSWER]},
        "malformed conversation",
    ),
    (
        "conversations-dict",
        {"id": "conversations-dict", "conversations": {"from": "human"}},
        "malformed conversation",
    ),
    ("image-not-string", {"id": "image-not-string", "image": 7, "conversations": CONV}, "bad image field"),
    ("image-empty", {"id": "image-empty", "image": "", "conversations": CONV}, "bad image field"),
    (
        "value-not-string",
        {"id": "value-not-string", "conversations": [{"from": "human", "value": 3}, ANSWER]},
        "malformed conversation",
    ),
    (
        "two-placeholders",
        {
            "id": "two-placeholders",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "<image> <image> What?"}, ANSWER],
        },
        "placeholder count",
    ),
    (
        "placeholder-in-answer",
        {
            "id": "placeholder-in-answer",
            "image": "good.png",
            "conversations": [QUESTION, {"from": "gpt", "value": "<image>"}],
        },
        "placeholder in an answer",
    ),
    (
        "empty-answer",
        {
            "id": "empty-answer",
            "image": "good.png",
            "conversations": [QUESTION, {"from": "gpt", "value": "  "}],
        },
        "empty answer",
    ),
    (
        "outside-relative",
        {"id": "outside-relative", "image": "../secret.png", "conversations": CONV},
        "image outside --images",
    ),
    (
        "outside-absolute",
        {"id": "outside-absolute", "image": "ABSOLUTE", "conversations": CONV},
        "image outside --images",
    ),
    ("too-large", {"id": "too-large", "image": "huge.png", "conversations": CONV}, "image too large"),
    ("missing-image", {"id": "missing-image", "image": "nope.png", "conversations": CONV}, "image not found"),
    ("not-an-image", {"id": "not-an-image", "image": "text.png", "conversations": CONV}, "image undecodable"),
    ("<entry 13>", {"id": ["a", "list"], "conversations": CONV}, "bad id"),
    ("<entry 14>", ["not", "an", "object"], "not an object"),
]


@pytest.fixture
def image_dir(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(images / "good.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    Image.new("RGB", (100, 100)).save(images / "huge.png")
    (images / "text.png").write_text("hello")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # huge.png (10⁴ pixels) is a bomb now
    return images


def entries(image_dir):
    rows = [entry for _, entry, _ in BROKEN_ENTRIES]
    absolute = next(r for r in rows if isinstance(r, dict) and r.get("image") == "ABSOLUTE")
    absolute["image"] = str(image_dir.parent / "secret.png")
    return rows + [{"id": "ok", "image": "good.png", "conversations": CONV}]


def test_every_broken_entry_is_skipped_with_its_id_file_and_reason(tmp_path, image_dir):
    source = tmp_path / "data.json"
    source.write_text(json.dumps(entries(image_dir)))
    report = convert_llava_json(source, image_dir, tmp_path / "out", progress=False)
    assert report.written == 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["kind"]) for s in skipped] == [(i, kind) for i, _, kind in BROKEN_ENTRIES]
    assert all(s["file"] == str(source) for s in skipped)
    by_id = {s["id"]: s["reason"] for s in skipped}
    assert "text.png" in by_id["not-an-image"] and "BytesIO" not in by_id["not-an-image"]
    assert "nope.png" in by_id["missing-image"]
    assert "--allow-outside-images" in by_id["outside-relative"]
    assert [ShardIndex(tmp_path / "out").record(0)["id"]] == ["ok"]


def test_images_outside_the_folder_are_read_when_allowed(tmp_path, image_dir):
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{"id": "up", "image": "../secret.png", "conversations": CONV}]))
    report = convert_llava_json(
        source, image_dir, tmp_path / "out", progress=False, allow_outside_images=True
    )
    assert report.written == 1


def test_json_lines_are_read_and_a_broken_line_is_skipped_with_its_line_number(tmp_path, image_dir):
    source = tmp_path / "data.jsonl"
    good = json.dumps({"id": "ok", "image": "good.png", "conversations": CONV})
    source.write_text(f"{good}\n{{not json\n\n{good.replace('ok', 'ok-2')}\n")
    report = convert_llava_json(source, image_dir, tmp_path / "out", progress=False)
    assert report.written == 2
    assert [(s["id"], s["kind"]) for s in report.skipped] == [("<line 2>", "invalid JSON line")]


def run_cli(*argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def convert_cli(source, images, out, *more, capsys):
    """`vtc data convert SOURCE --images IMAGES --out OUT [more]`: (exit code, stdout, stderr)."""
    return run_cli(
        "data", "convert", str(source), "--images", str(images), "--out", str(out), *more, capsys=capsys
    )


def test_a_file_that_is_not_json_names_itself(tmp_path, image_dir, capsys):
    source = tmp_path / "data.json"
    source.write_text("[{'id': 1}]")
    code, _, err = convert_cli(str(source), str(image_dir), str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and str(source) in err and "not valid JSON" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def write_entries(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_converting_into_a_folder_with_shards_is_refused_unless_overwrite_or_append(
    tmp_path, image_dir, capsys
):
    one = write_entries(tmp_path / "one.json", [{"id": "a", "image": "good.png", "conversations": CONV}])
    two = write_entries(
        tmp_path / "two.json", [{"id": f"b{i}", "image": "good.png", "conversations": CONV} for i in range(3)]
    )
    out = tmp_path / "out"
    small = ("--samples-per-shard", "2")
    assert convert_cli(one, image_dir, out, *small, capsys=capsys)[0] == 0
    code, _, err = convert_cli(two, image_dir, out, *small, capsys=capsys)
    assert code == 2 and "already holds 1 shard" in err and "--append" in err
    assert [ShardIndex(out).record(i)["id"] for i in range(len(ShardIndex(out)))] == ["a"]  # untouched

    assert convert_cli(two, image_dir, out, *small, "--append", capsys=capsys)[0] == 0
    index = ShardIndex(out)
    assert [index.record(i)["id"] for i in range(len(index))] == ["a", "b0", "b1", "b2"]
    assert len(list(out.glob("*.tar"))) == 3  # shard-000000 kept, two new ones after it

    assert convert_cli(one, image_dir, out, *small, "--overwrite", capsys=capsys)[0] == 0
    index = ShardIndex(out)
    assert [index.record(i)["id"] for i in range(len(index))] == ["a"] and len(list(out.glob("*.tar"))) == 1


def test_appending_after_a_deleted_shard_replaces_none(tmp_path, image_dir, capsys):
    """A shard deleted from the middle of a folder (a corrupt one, say) leaves fewer shards than
    the highest number: `--append` numbers after the highest, so no old shard is overwritten."""
    rows = lambda prefix: [  # noqa: E731
        {"id": f"{prefix}{i}", "image": "good.png", "conversations": CONV} for i in range(3)
    ]
    out = tmp_path / "out"
    one = ("--samples-per-shard", "1")
    assert (
        convert_cli(write_entries(tmp_path / "a.json", rows("a")), image_dir, out, *one, capsys=capsys)[0]
        == 0
    )
    (out / "shard-000001.tar").unlink()
    assert (
        convert_cli(
            write_entries(tmp_path / "b.json", rows("b")), image_dir, out, *one, "--append", capsys=capsys
        )[0]
        == 0
    )
    index = ShardIndex(out)
    assert [index.record(i)["id"] for i in range(len(index))] == ["a0", "a2", "b0", "b1", "b2"]
    assert sorted(p.name for p in out.glob("*.tar"))[-1] == "shard-000005.tar"


def test_a_second_writer_of_a_shard_folder_is_refused_before_it_writes(tmp_path, image_dir, capsys):
    """Two conversions into one folder at once would name their shards alike (two new ones each
    publish shard-000000.tar; two appends number after the same highest): while one writes,
    the other is refused; afterwards nothing of the lock is left beside the folder."""
    import fcntl

    rows = [{"id": f"a{i}", "image": "good.png", "conversations": CONV} for i in range(2)]
    source = write_entries(tmp_path / "a.json", rows)
    out = tmp_path / "out"
    with open(tmp_path / ".out.vtc-lock", "a") as held:  # what a running conversion holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = convert_cli(source, image_dir, out, capsys=capsys)
    assert code == 2 and f"another vtc command is writing {out} now" in err
    assert not out.exists()
    assert convert_cli(source, image_dir, out, capsys=capsys)[0] == 0
    assert len(ShardIndex(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "images", "out", "secret.png"]


def test_a_writer_stopped_by_a_signal_leaves_no_partial_shards(tmp_path):
    """A conversion's partial shards take as much disk as the data: SIGTERM removes them on the
    way out (exit 143, `train.signals`), and what SIGKILL left is removed by the next writer of
    that folder, which alone holds its lock."""
    import signal
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.cli", "data", "synth", "--out", str(out), "--samples", "100000"]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.vtc-tmp-*/*.tar")) and time.time() < deadline:
        time.sleep(0.1)
    writer.send_signal(signal.SIGTERM)
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert "vtc: terminated (SIGTERM); what was being written is removed" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".out.vtc-tmp-killed").mkdir()  # as SIGKILL leaves it
    (tmp_path / ".out-v2.vtc-tmp-writing").mkdir()  # another folder's writer: not touched
    subprocess.run([*cmd[:-1], "20"], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out-v2.vtc-tmp-writing", "out"]


def test_overwrite_never_takes_the_source_data_with_the_old_shards(tmp_path, image_dir, capsys):
    """Shards written beside their own JSON and images: `--overwrite` replaces the folder whole,
    so it is refused there, before and after shards exist, and nothing is lost."""
    source = write_entries(
        image_dir / "llava.json", [{"id": "a", "image": "good.png", "conversations": CONV}]
    )
    before = sorted(p.name for p in image_dir.iterdir())
    code, _, err = convert_cli(source, image_dir, image_dir, "--overwrite", capsys=capsys)
    assert code == 2 and "holds more than shards (good.png, huge.png, llava.json, ...)" in err
    assert convert_cli(source, image_dir, image_dir, capsys=capsys)[0] == 0  # beside them: allowed
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(
        [*before, "shard-000000.tar", "skipped.jsonl"]
    )
    code, _, err = convert_cli(source, image_dir, image_dir, "--overwrite", capsys=capsys)
    assert code == 2 and "give the shards a folder of their own" in err
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(
        [*before, "shard-000000.tar", "skipped.jsonl"]
    )
    synth = ["data", "synth", "--out", str(image_dir), "--samples", "2", "--overwrite"]
    assert run_cli(*synth, capsys=capsys)[0] == 2 and (image_dir / "llava.json").is_file()


def test_a_typo_in_images_is_named_and_most_entries_failing_alike_exits_non_zero(tmp_path, image_dir, capsys):
    rows = [{"id": f"s{i}", "image": f"img{i}.png", "conversations": CONV} for i in range(4)]
    rows.append({"id": "ok", "image": "good.png", "conversations": CONV})
    source = write_entries(tmp_path / "data.json", rows)
    code, _, err = convert_cli(str(source), str(tmp_path / "imgaes"), str(tmp_path / "a"), capsys=capsys)
    assert code == 2 and "imgaes: no such folder" in err
    code, out, err = convert_cli(str(source), str(image_dir), str(tmp_path / "b"), capsys=capsys)
    assert code == 1 and "80%" in err and "4" in err and "image not found" in err
    assert "written 1, skipped 4 of 5" in out and "4 × image not found" in out
    code, _, _ = convert_cli(
        str(source), str(image_dir), str(tmp_path / "c"), "--max-skipped", "0.9", capsys=capsys
    )
    assert code == 0


def test_the_loader_skips_what_the_converter_would_refuse_with_the_sample_id(tmp_path, tokenizer):
    """Shards from elsewhere (or an older vtc): two placeholders for one image, a placeholder
    without an image, answers of unknown words only, image bytes that do not decode."""
    png = encode_png(Image.new("RGB", (8, 8)))
    with ShardWriter(tmp_path / "shards") as writer:
        writer.write(
            {"id": "two", "conversations": [{"from": "human", "value": "<image><image>"}, ANSWER]}, png
        )
        writer.write({"id": "orphan", "conversations": CONV})
        writer.write(
            {"id": "unknown", "conversations": [QUESTION, {"from": "gpt", "value": "zxqv blorft"}]}, png
        )
        writer.write({"id": "corrupt", "conversations": CONV}, b"\x89PNG not really")
        writer.write({"id": "truncated", "conversations": CONV}, encode_png(Image.new("RGB", (64, 64)))[:60])
        writer.write({"id": "ok", "conversations": CONV}, png)
    dataset = ConversationDataset(ShardIndex(tmp_path / "shards"), tokenizer, "vicuna_v1", 16, 4, 512, 4)
    items = [dataset[i] for i in range(6)]
    assert [(item.id, item.reason.split(": ", 1)[1]) for item in items[:3]] == [
        ("two", "one image but 2 <image> placeholders in its questions (needs exactly 1)"),
        ("orphan", "an <image> placeholder but no image"),
        ("unknown", "every answer is empty or made only of unknown tokens"),
    ]
    # image bytes that do not decode, whole or cut short, are skipped with PIL's reason
    assert [(item.id, item.reason.split(":")[0]) for item in items[3:5]] == [
        ("corrupt", "UnidentifiedImageError"),
        ("truncated", "OSError"),
    ]
    assert not isinstance(items[5], Skipped)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "x", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
        (["evaluate", "x", "--tokens", "-4"], "argument --tokens: must be at least 1"),
        (["evaluate", "x", "--tokens", "abc"], "argument --tokens: expected a whole number, got 'abc'"),
        (["evaluate", "x", "--limit", "0"], "argument --limit: must be at least 1"),
        (
            ["data", "convert", "x.json", "--images", ".", "--out", "o", "--fraction", "2"],
            "argument --fraction",
        ),
    ],
)
def test_cli_options_are_checked_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "/nonexistent", "--baselines", "pooling,divprun"], "--baselines: unknown 'divprun'"),
        (["evaluate", "/nonexistent"], "/nonexistent: no such run directory, vtc export or llava-hf folder"),
        (["export", "/nonexistent", "/tmp/vtc-never"], "/nonexistent: no such folder"),
        (
            ["train", "tiny/smoke", "output=/proc/vtc-never"],
            "output /proc/vtc-never: cannot create the run folder there (No such file or directory)",
        ),
        (["validate", "tiny/smoke", "stages.0.steps=[10"], "not valid YAML"),
        (["validate", "tiny/smoke", "stages.0.batch_size=0"], "stages[0].batch_size: must be ≥ 1"),
        (["data", "synth", "--out", "/tmp/vtc-never", "--samples", "1", "--objects", "3", "16"], "17 cells"),
        (
            ["data", "synth", "--out", "/tmp/vtc-never", "--samples", "1", "--families", "cell"],
            "scored family",
        ),
    ],
)
def test_cli_misuse_is_one_clear_line(argv, message, capsys):
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_synthetic_cache_that_cannot_be_written_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(
        "train", "tiny/smoke", f"output={tmp_path / 'run'}", "data.cache_dir=/proc/vtc-never", capsys=capsys
    )
    assert code == 2 and "Traceback" not in err
    assert "data.cache_dir /proc/vtc-never: cannot write the synthetic test split there" in err


def test_a_full_disk_or_gpu_memory_is_one_line_with_what_to_do(monkeypatch, capsys):
    """Out of disk or GPU memory is the machine's state, not a bug: one line, exit 2, and for
    GPU memory what to lower, by command. Any other OSError or RuntimeError keeps its traceback."""
    import errno

    import torch

    from train import cli

    def raising(error):
        def command(args):
            raise error

        return command

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/logs/instruct/metrics.csv")
    monkeypatch.setattr(cli, "cmd_train", raising(full))
    assert main(["train", "tiny/smoke"]) == 2
    assert "no space left on the device writing /runs/x/logs/instruct/metrics.csv" in capsys.readouterr().err
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    for command, argv, hint in (
        ("cmd_train", ["train", "tiny/smoke"], "stages.N.batch_size"),
        ("cmd_resume", ["resume", "runs/x"], "stages.N.batch_size"),
        ("cmd_evaluate", ["evaluate", "runs/x"], "--batch-size"),
    ):
        monkeypatch.setattr(cli, command, raising(oom))
        assert main(argv) == 2
        said = capsys.readouterr().err
        assert said.startswith(
            "vtc: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.)"
        )
        assert hint in said and "Traceback" not in said
    for error in (OSError(errno.EACCES, "Permission denied"), RuntimeError("shape mismatch")):
        monkeypatch.setattr(cli, "cmd_train", raising(error))
        with pytest.raises(type(error)):
            main(["train", "tiny/smoke"])
    monkeypatch.setattr(cli, "cmd_export", raising(oom))  # no hint for it: a bug until one is known
    with pytest.raises(torch.OutOfMemoryError):
        main(["export", "runs/x", "out"])


def test_relative_outputs_and_the_data_cache_follow_the_working_directory(tmp_path, monkeypatch):
    from train.datamodule import synthetic_shards
    from train.recipe import load_recipe
    from train.run import run_dir_of

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny/smoke", ["data.synthetic.train=4", "data.synthetic.test=2"])
    assert run_dir_of(recipe) == tmp_path / recipe.output
    assert synthetic_shards(recipe.data, "test").is_relative_to(tmp_path / "checkpoints" / "data")
    # scenes of another size of crowd are another cache, never the default's shards reused
    crowded = load_recipe(
        "tiny/smoke", ["data.synthetic.train=4", "data.synthetic.test=2", "data.synthetic.objects=[6, 8]"]
    )
    assert synthetic_shards(crowded.data, "test").parent != synthetic_shards(recipe.data, "test").parent
    index = ShardIndex(synthetic_shards(crowded.data, "test"))
    assert all(6 <= len(index.record(i)["scene"]["objects"]) <= 8 for i in range(len(index)))
    # so are scenes asked other questions (their scenes are drawn to suit them)
    match = load_recipe(
        "tiny/smoke", ["data.synthetic.train=4", "data.synthetic.test=2", "data.synthetic.families=[match]"]
    )
    index = ShardIndex(synthetic_shards(match.data, "test"))
    assert synthetic_shards(match.data, "test").parent != synthetic_shards(recipe.data, "test").parent
    assert all(index.record(i)["families"] == ["match"] for i in range(len(index)))


def test_validate_in_a_fresh_process_prints_no_traceback_for_a_recipe_with_many_problems(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "description: x\noutput: o\nstages:\n  - {name: a, steps: -1, batch_size: 0}\ntrainer: {devices: 0}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "train.cli", "validate", str(recipe)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "3 problem(s)" in result.stderr and str(recipe) in result.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["stages.1.batch_size=1000"], "1000 samples per step, but the training data has only 256"),
        (["data.max_length=5"], "none of the first 64 training samples is usable"),
        (["stages.1.optim.lr=1e9"], "non-finite loss"),
    ],
)
def test_a_stage_that_would_train_on_nothing_or_diverges_stops_with_one_line(
    overrides, message, tmp_path, capsys
):
    from tests.conftest import smoke_train_cmd

    command = smoke_train_cmd(tmp_path / "run", tmp_path / "data", *overrides)[3:]  # vtc's arguments
    code, _, err = run_cli(*command, capsys=capsys)  # an internal error would raise here
    assert code == 2 and message in err


def test_a_bad_test_shard_is_refused_before_training_not_after(tmp_path, synth_dirs, capsys):
    from tests.conftest import smoke_train_cmd

    test = tmp_path / "test"
    test.mkdir()
    (test / "shard-000000.tar").write_bytes(b"")  # e.g. a copy that failed
    shards = [f"data.train_shards={synth_dirs / 'train'}", f"data.test_shards={test}"]
    command = smoke_train_cmd(tmp_path / "run", tmp_path / "data", "data.synthetic=null", *shards)[3:]
    code, out, err = run_cli(*command, "stages.0.objective=lm", capsys=capsys)
    assert code == 2
    assert f"{test / 'shard-000000.tar'} is not a readable tar shard (empty file)" in err
    assert not (tmp_path / "run" / "ckpt").exists() and "stage 'vision'" not in out


def test_samples_a_stage_cannot_train_on_are_listed_with_their_id_and_counted(tmp_path):
    """At max_length 105 some of the tiny smoke run's samples keep no answer token: the stage
    trains on the others and lists the ones it left out, per rank, with the reason."""
    from tests.conftest import smoke_train_cmd

    run = tmp_path / "run"
    command = smoke_train_cmd(run, tmp_path / "data", "data.max_length=105", "stages.1.steps=4")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # quiet: DeepSpeed (imported by the model save) is told there is no GPU instead of warning
    # and Lightning's chatter (accelerators it did not find, max_steps reached) is left out
    for chatter in ("Setting accelerator to CPU", "GPU available:", "`Trainer.fit` stopped"):
        assert chatter not in result.stdout + result.stderr
    listed = [json.loads(line) for line in (run / "skipped-instruct-rank0.jsonl").read_text().splitlines()]
    assert listed and len({entry["id"] for entry in listed}) == len(listed)
    assert all(e["reason"] == "no supervised tokens left within max_length=105" for e in listed)
    stages = {s["name"]: s for s in json.loads((run / "meta.json").read_text())["stages"]}
    assert stages["instruct"]["skipped_samples"] == len(listed) and stages["instruct"]["steps"] == 4
    assert f"skipped {len(listed)} sample(s)" in result.stdout
    assert not (run / "skipped-vision-rank0.jsonl").exists()  # the region stage trains on cells, not answers


def test_synthetic_data_never_mixes_into_or_half_fills_a_folder(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        run_cli("data", "synth", "--out", str(out), "--samples", "3", "--split", "test", capsys=capsys)[0]
        == 0
    )
    code, _, err = run_cli(
        "data", "synth", "--out", str(out), "--samples", "2", "--split", "test", capsys=capsys
    )
    assert code == 2 and "already holds 1 shard" in err and len(ShardIndex(out)) == 3
    assert (
        run_cli(
            "data",
            "synth",
            "--out",
            str(out),
            "--samples",
            "2",
            "--split",
            "test",
            "--overwrite",
            capsys=capsys,
        )[0]
        == 0
    )
    assert len(ShardIndex(out)) == 2 and [p.name for p in tmp_path.iterdir()] == [
        "synth"
    ]  # no temporary left


def test_an_interrupted_synthetic_split_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    import train.datamodule
    from train.recipe import load_recipe

    def interrupted(out_dir, *args, **kwargs):
        (out_dir / "shard-000000.tar").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.datamodule, "write_synthetic", interrupted)
    recipe = load_recipe("tiny/smoke", [f"data.cache_dir={tmp_path}", "data.synthetic.test=2"])
    with pytest.raises(KeyboardInterrupt):
        train.datamodule.synthetic_shards(recipe.data, "test")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the next run starts clean


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_trained_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainable.safetensors").write_bytes(b"the finished run's weights")
    command = ["train", "tiny/smoke", f"output={run}", f"data.cache_dir={tmp_path / 'data'}"]
    for more in ([], ["--resume", "auto"]):
        code, _, err = run_cli(*command, *more, capsys=capsys)
        assert code == 2 and "holds a finished run and no checkpoint to resume from" in err
    assert (run / "trainable.safetensors").read_bytes() == b"the finished run's weights"


def test_a_folder_that_is_not_a_run_is_not_written_into(tmp_path, capsys):
    """`output=` pointing at the user's own folder (here: the folder of their recipe.yaml, which
    the run's resolved recipe would replace) is refused before anything is written; a run of
    vtc's own, stopped before its first checkpoint, still starts in its folder."""
    from train.recipe import RECIPES_DIR

    folder = tmp_path / "project"
    folder.mkdir()
    mine = (RECIPES_DIR / "tiny" / "smoke.yaml").read_text() + "# my notes\n"
    (folder / "recipe.yaml").write_text(mine)
    before = sorted(path.name for path in folder.iterdir())
    command = [
        "train",
        str(folder / "recipe.yaml"),
        f"output={folder}",
        f"data.cache_dir={tmp_path / 'data'}",
    ]
    for more in ([], ["--restart"], ["--resume", "auto"]):
        code, _, err = run_cli(*command, *more, capsys=capsys)
        assert code == 2 and "holds files that are not a vtc run (recipe.yaml)" in err
    assert (folder / "recipe.yaml").read_text() == mine
    assert sorted(path.name for path in folder.iterdir()) == before

    from train.run import RUN_RECIPE_HEADER, refuse_foreign_output

    starting = tmp_path / "starting"  # under DDP: another rank is writing recipe.yaml right now
    starting.mkdir()
    (starting / ".recipe.yaml.x1y2").write_text("")
    refuse_foreign_output(starting)

    stopped = tmp_path / "stopped"  # what a run killed during its first stage leaves
    stopped.mkdir()
    (stopped / "recipe.yaml").write_text(RUN_RECIPE_HEADER + mine)
    code, _, err = run_cli(
        "train", "tiny/smoke", f"output={stopped}", f"data.cache_dir={tmp_path / 'data'}", capsys=capsys
    )
    assert code == 0, err
    assert (stopped / "trainable.safetensors").is_file()


def test_wandb_online_without_a_login_is_a_clear_error_before_training(tmp_path):
    """`wandb.mode=online` on a machine with no wandb login stops at the first stage's start with
    wandb's reason and the offline alternative, not a wandb traceback; nothing was trained."""
    from tests.conftest import smoke_train_cmd

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc or wandb settings with a key
    run = tmp_path / "run"
    command = smoke_train_cmd(run, tmp_path / "data", "wandb.enabled=true", "wandb.mode=online")
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "vtc: error: wandb (mode online): No API key configured" in result.stderr
    assert f"wandb.mode=offline, and upload later: wandb sync {run}/wandb/offline-run-*" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "ckpt").exists()


def test_a_second_run_on_an_output_being_trained_is_refused(tmp_path, capsys):
    """While one process trains a run (it holds the kernel lock on RUN_DIR/.vtc-lock), `vtc
    train` or `vtc resume` on the same output is refused before it writes anything; once the
    first lets go, the same command runs."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    command = ["train", "tiny/smoke", f"output={run}", f"data.cache_dir={tmp_path / 'data'}"]
    with (run / ".vtc-lock").open("a") as first:  # what a running `vtc train` holds
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for more in ([], ["--restart"], ["--resume", "auto"]):
            code, _, err = run_cli(*command, *more, capsys=capsys)
            assert code == 2 and f"another vtc process is training {run} now" in err
        assert sorted(path.name for path in run.iterdir()) == [".vtc-lock"]
    code, _, err = run_cli(*command, capsys=capsys)
    assert code == 0, err
    assert (run / "trainable.safetensors").is_file()
