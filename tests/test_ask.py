"""`vtc ask` answers as `vtc evaluate` answers the same questions, for a model and a training-free
baseline on it; bad images and questions are one line before any weights load."""

import io
import json
import sys

import pytest

from data.synth import final_answer, make_sample
from models.pretrained import shipped_path
from train.cli import main
from train.evaluation.measure import Settings

BASE = "tiny-llava"


def write_images(root, count: int = 2) -> dict[str, list[dict]]:
    """Synthetic test images under root/images and a question file for them; the questions of
    each image, by file name."""
    (root / "images").mkdir()
    asked: dict[str, list[dict]] = {}
    for index in range(count):
        sample = make_sample("test", index, 0, 64, 4)
        name = f"{index}.png"
        sample["image"].save(root / "images" / name)
        convs = sample["conversations"]
        asked[name] = [
            {
                "question_id": f"{index}-{turn // 2}",
                "image": name,
                "text": convs[turn]["value"].replace("<image>", "").strip(),
                "answer": final_answer(convs[turn + 1]["value"]),
            }
            for turn in range(0, len(convs), 2)
        ]
    lines = [json.dumps(row) + "\n" for rows in asked.values() for row in rows]
    (root / "questions.jsonl").write_text("".join(lines))
    return asked


def asked(capsys, *argv: str) -> list[dict]:
    """`vtc ask --json ...`'s answers."""
    assert main(["ask", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
def test_ask_answers_as_evaluate_does(tmp_path, capsys):
    from train.evaluate import evaluate

    questions = write_images(tmp_path)
    settings = Settings(timing=False)
    report = evaluate(
        str(shipped_path(BASE)),
        ["pooling", "fastv"],
        [16],
        out_dir=tmp_path / "report",
        questions_file=str(tmp_path / "questions.jsonl"),
        images_dir=str(tmp_path / "images"),
        settings=settings,
    )
    capsys.readouterr()

    def evaluated(row: str) -> dict[str, str]:
        lines = (tmp_path / "report" / f"answers-{row}.jsonl").read_text().splitlines()
        return {line["question_id"]: line["text"] for line in map(json.loads, lines)}

    limit = str(settings.max_new_tokens)
    # FastV prunes inside the LLM: all 64 enter it, its later layers see 16
    layer_means = {(r["method"], r["budget"]): r["visual_tokens_layer_mean"] for r in report["rows"]}
    asked_means: dict[tuple, list[float]] = {}
    for row, method, flags, tokens in (
        ("baseline", "baseline", [], 64),
        ("pooling-16", "pooling", ["--compressor", "pooling", "--tokens", "16"], 16),
        ("fastv-16", "fastv", ["--compressor", "fastv", "--tokens", "16"], 64),
    ):
        expected = evaluated(row)
        for name, rows in questions.items():
            image = str(tmp_path / "images" / name)
            got = asked(capsys, BASE, image, *[r["text"] for r in rows], "--max-new-tokens", limit, *flags)
            assert [g["question"] for g in got] == [r["text"] for r in rows]  # in the order asked
            assert [g["answer"] for g in got] == [expected[r["question_id"]] for r in rows], (row, name)
            assert {g["visual_tokens"] for g in got} == {tokens}
            assert all(g["visual_tokens_layer_mean"] == sum(g["visual_tokens_layers"]) / 4 for g in got)
            key = (method, None if method == "baseline" else 16)
            asked_means.setdefault(key, []).extend(g["visual_tokens_layer_mean"] for g in got)
    # `vtc evaluate`'s layer mean is the mean over its questions of what `vtc ask` says of each
    assert {k: sum(v) / len(v) for k, v in asked_means.items()} == pytest.approx(layer_means)
    assert layer_means["fastv", 16] < 64 == layer_means["baseline", None]
    # the base sees what it is asked about (most answers right), so a wrong prompt would show
    base = evaluated("baseline")
    rows = [r for rows in questions.values() for r in rows]
    assert sum(final_answer(base[r["question_id"]]) == r["answer"] for r in rows) >= 0.8 * len(rows)
    # the two models differ, so the comparison above can fail
    assert base != evaluated("pooling-16")


def test_questions_from_stdin_and_after_flags(tmp_path, capsys, monkeypatch):
    questions = write_images(tmp_path, 1)["0.png"]
    image = str(tmp_path / "images" / "0.png")
    texts = [r["text"] for r in questions]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts[:2]) + "\n\n"))
    piped = asked(capsys, BASE, image)
    assert [p["question"] for p in piped] == texts[:2]
    # a question after a flag is a question, not an unknown argument
    assert main(["ask", BASE, image, "--max-new-tokens", "8", texts[0]]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == piped[0]["answer"]  # one question: the answer alone
    assert "64 visual tokens of the image entered the LLM\n" in out.err


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda path: path.write_text("not an image"), "cannot decode (UnidentifiedImageError"),
        (lambda path: path.write_bytes(png_bytes()[:150]), "image file is truncated"),
        (lambda path: None, "no such file"),
        (lambda path: path.mkdir(), "Is a directory"),
    ],
)
def test_an_unreadable_image_is_one_line_before_the_model_loads(
    tmp_path, capsys, monkeypatch, write, expected
):
    import train.evaluation.sources as sources

    monkeypatch.setattr(sources, "model_for", refused)  # no weights for an image it cannot read
    image = tmp_path / "x.png"
    write(image)
    assert main(["ask", BASE, str(image), "What colour is the circle?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vtc: error: {image}: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_a_decompression_bomb_is_refused_as_the_converter_refuses_it(tmp_path, capsys, monkeypatch):
    from PIL import Image

    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())  # 64 × 64 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # PIL refuses over twice this
    assert main(["ask", BASE, str(image), "What colour is the circle?"]) == 2
    assert "decompression bomb" in capsys.readouterr().err


def test_empty_question_or_compressor_without_count_is_refused(tmp_path, capsys, monkeypatch):
    import train.evaluation.sources as sources

    write_images(tmp_path, 1)
    image = str(tmp_path / "images" / "0.png")
    monkeypatch.setattr(sources.Source, "base", refused)  # refused from the config alone
    assert main(["ask", BASE, image, "What colour is the dot?", "  "]) == 2
    assert "question 2 is empty" in capsys.readouterr().err
    assert main(["ask", BASE, image, "q", "--compressor", "pooling"]) == 2
    assert "needs a count of visual tokens" in capsys.readouterr().err


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    make_sample("test", 0, 0, 64, 4)["image"].save(buffer, format="PNG")
    return buffer.getvalue()


def test_at_a_terminal_it_asks_until_an_empty_line(tmp_path, capsys, monkeypatch):
    questions = write_images(tmp_path, 1)["0.png"]
    typed = iter([questions[0]["text"], questions[1]["text"], ""])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    assert main(["ask", BASE, str(tmp_path / "images" / "0.png"), "--max-new-tokens", "8"]) == 0
    at_terminal = capsys.readouterr().out.splitlines()
    both = asked(capsys, BASE, str(tmp_path / "images" / "0.png"), *[q["text"] for q in questions[:2]])
    assert at_terminal == [b["answer"] for b in both]  # each answered as it was typed
    with pytest.raises(StopIteration):
        next(typed)  # the empty line ended it


def refused(*args, **kwargs):
    raise AssertionError("built a model for what should have been refused first")


def test_the_visual_token_line_says_what_the_layers_saw_where_fewer():
    from train.cli import visual_tokens_line

    assert visual_tokens_line([(16, 16.0)]) == "16 visual tokens of the image entered the LLM"
    assert visual_tokens_line([(64, 52.0), (64, 16.0)]) == (
        "64 visual tokens of the image entered the LLM; its layers saw 16.0-52.0 on average"
    )


def test_a_setting_changed_at_test_time_answers_as_its_evaluation_row(tmp_path, capsys):
    """`--setting falcon.reatten=false`: answers as `vtc evaluate --setting` scores that row."""
    import torch

    from tests.conftest import falcon_export
    from train.evaluate import evaluate

    questions = write_images(tmp_path, 3)
    torch.manual_seed(0)
    out = falcon_export(tmp_path / "export", scale=1.0)  # far from its copy: switching it off shows
    evaluate(
        str(out),
        [],
        [16],
        out_dir=tmp_path / "report",
        questions_file=str(tmp_path / "questions.jsonl"),
        images_dir=str(tmp_path / "images"),
        settings=Settings(timing=False, max_new_tokens=8),
        test_settings=["falcon.reatten=false"],
        baseline="none",
    )
    rows = {}
    for label in ("model", "model[falcon.reatten=false]"):
        lines = (tmp_path / "report" / f"answers-{label}.jsonl").read_text().splitlines()
        rows[label] = {a["question_id"]: a["text"] for a in map(json.loads, lines)}
    got = {"model": {}, "model[falcon.reatten=false]": {}}
    for name, asked_here in questions.items():
        texts = [q["text"] for q in asked_here]
        image = str(tmp_path / "images" / name)
        for label, flags in (
            ("model", []),
            ("model[falcon.reatten=false]", ["--setting", "falcon.reatten=false"]),
        ):
            answers = asked(capsys, str(out), image, *texts, "--max-new-tokens", "8", *flags)
            got[label].update(
                {q["question_id"]: a["answer"] for q, a in zip(asked_here, answers, strict=True)}
            )
    assert got == rows
    assert rows["model"] != rows["model[falcon.reatten=false]"]  # the setting changed answers
    assert main(["ask", str(out), image, "q", "--setting", "falcon.registers=8"]) == 2
    assert "can change at test time: reatten" in capsys.readouterr().err
