"""`vtc evaluate`: scoring, question files, batching invariance, the report files."""

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.errors import UserError
from data.synth import FAMILIES
from models.build import ComponentSpec, build
from models.compressors import baselines, component_class
from models.compressors.base import ModelDims
from tests.conftest import TEST_TINY
from train.accuracy import (
    Question,
    QuestionSet,
    agreement,
    answer_questions,
    file_questions,
    normalize_answer,
    score,
)
from train.evaluation.measure import LiveTensorBytes


def test_normalize_and_score_on_fixtures():
    assert normalize_answer("The Red.") == "red" and normalize_answer("  a  big   CAT ") == "big cat"
    questions = QuestionSet(
        [
            Question("1", "a", "colour", "?", ("red",)),
            Question("2", "a", "colour", "?", ("blue",)),
            Question("3", "a", "count", "?", ("3",)),
            Question("4", "a", "count", "?", ()),  # unscored
        ],
        read_image=lambda key: b"",
    )
    answers = {
        "1": {"text": "Red", "visual_tokens": 4},
        "2": {"text": "green", "visual_tokens": 4},
        "3": {"text": "3", "visual_tokens": 2},
        "4": {"skipped": "image 'a': OSError"},
    }
    result = score(questions, answers)
    assert result["per_family"] == {"colour": 0.5, "count": 1.0}
    assert result["accuracy"] == 0.75  # mean over families
    assert result["per_question"] == pytest.approx(2 / 3)
    assert (
        result["count"] == 3
        and result["skipped"] == ["4"]
        and result["visual_tokens"] == pytest.approx(10 / 3)
    )
    assert "vqa_accuracy" not in result
    # agreement with a reference model's answers: the share answered the same (right or wrong)
    reference = {"1": {"text": "red"}, "2": {"text": "green"}, "3": {"text": "4"}, "4": {"text": "x"}}
    assert agreement(questions, answers, reference) == pytest.approx(2 / 3)  # 4 was skipped
    assert agreement(questions, answers, {}) is None
    # VQA-style: 10 human answers, min(1, matches / 3)
    vqa = QuestionSet([Question("1", "a", "all", "?", ("2",) * 2 + ("two",) * 8)], read_image=lambda key: b"")
    assert score(vqa, {"1": {"text": "2", "visual_tokens": 1}})["vqa_accuracy"] == pytest.approx(2 / 3)


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_question_file_answers_and_skips_unreadable_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes("red"))
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    lines = [
        {
            "question_id": 7,
            "image": "red.png",
            "text": "<image>\nWhat colour ?",
            "answer": "red",
            "category": "c",
        },
        {"question_id": 8, "image": "broken.png", "text": "What colour ?"},
        {"question_id": 9, "image": "missing.png", "text": "What colour ?"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    questions = file_questions(path, tmp_path / "img")
    assert [q.id for q in questions.questions] == ["7", "8", "9"]
    assert questions.questions[0].text == "What colour ?" and questions.questions[0].answers == ("red",)
    built = build("tiny", tiny=TEST_TINY)
    answers = answer_questions(built.model, built.tokenizer, questions, 64, progress=False)
    assert "text" in answers["7"]
    assert "skipped" in answers["8"] and "broken.png" in answers["8"]["skipped"]
    assert "skipped" in answers["9"] and "missing.png" in answers["9"]["skipped"]
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "image": "x.png"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not a question line"):
        file_questions(tmp_path / "bad.jsonl", tmp_path)
    line = '{"question_id": 7, "image": "x.png", "text": "q"}\n'
    (tmp_path / "twice.jsonl").write_text(line + "\n" + line.replace("7", "8") + line)
    with pytest.raises(UserError, match=r"twice.jsonl:4: question_id 7 again \(first on line 1\)"):
        file_questions(tmp_path / "twice.jsonl", tmp_path)
    with pytest.raises(UserError, match=r"none.jsonl: no such question file"):
        file_questions(tmp_path / "none.jsonl", tmp_path)
    with pytest.raises(UserError, match=r"nowhere: no such image folder \(for .*q.jsonl\)"):
        file_questions(path, tmp_path / "nowhere")


def test_a_question_file_whose_first_image_is_missing_is_measured_on_the_others(tmp_path):
    """The costs are measured on questions that were asked: before, the first question's image
    was read for them, and a missing one ended the evaluation with a bare file error."""
    from models.pretrained import shipped_path
    from train.evaluate import Settings, evaluate

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes("red"))
    lines = [
        {"question_id": 1, "image": "missing.png", "text": "What colour is the dot?", "answer": "red"},
        {"question_id": 2, "image": "red.png", "text": "What colour is the dot?", "answer": "red"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = Settings(timing=True, repeats=1, latency_batch=2)
    args = dict(questions_file=str(tmp_path / "q.jsonl"), images_dir=str(tmp_path / "img"), settings=settings)
    base = str(shipped_path("tiny-llava"))
    report = evaluate(base, ["pooling"], [16], out_dir=tmp_path / "out", **args)
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["baseline"]["skipped"] == rows["pooling"]["skipped"] == ["1"]
    assert rows["pooling"]["visual_tokens_layer_mean"] == 16 and rows["pooling"]["prefill_ms_batch1"] > 0
    assert rows["pooling"]["batch_n"] == 1  # the one question asked
    (tmp_path / "img" / "red.png").unlink()
    with pytest.raises(
        UserError, match=r"none of the 2 questions could be asked: image 'missing.png'.*\(and 1 more\)"
    ):
        evaluate(base, [], out_dir=tmp_path / "out2", **args)


def _one_row(tmp_path, source, asked: list[tuple[str, str]], baseline: str | None = "none") -> dict:
    """The first row of `vtc evaluate SOURCE --baseline BASELINE --no-timing` on a question file
    holding `asked`, (image file under tmp_path/img, question) pairs."""
    from train.evaluate import Settings, evaluate

    lines = [{"question_id": i, "image": image, "text": text} for i, (image, text) in enumerate(asked)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = evaluate(
        str(source),
        [],
        out_dir=tmp_path / f"out{len(list(tmp_path.glob('out*')))}",
        questions_file=str(tmp_path / "q.jsonl"),
        images_dir=str(tmp_path / "img"),
        settings=Settings(timing=False),
        baseline=baseline,
    )
    return report["rows"][0]


def test_the_flops_of_images_cut_into_different_grids_are_their_mean(tmp_path):
    """Each question's image counts with its own views: a wide image (1 × 2 crops) and a square
    one (2 × 2) asked together cost the mean of what each costs alone, the tower, the projector
    and the LLM; before, every question was counted as the first one's image."""
    from models.export import export
    from models.pretrained import shipped_path
    from models.views import MultiViewConfig

    base = str(shipped_path("tiny-llava"))
    built = build(base, views=MultiViewConfig(((1, 1), (1, 2), (2, 2)), newline=False))
    out = export(built, tmp_path / "views", ComponentSpec("mlp2x_gelu"), [], base, compressor_only=True)
    (tmp_path / "img").mkdir()
    for name, size in (("wide.png", (128, 64)), ("square.png", (128, 128))):
        Image.new("RGB", size, "red").save(tmp_path / "img" / name)
    question = "What colour is the dot?"
    wide, square = (
        _one_row(tmp_path, out, [("wide.png", question)]),
        _one_row(tmp_path, out, [("square.png", question)]),
    )
    both = _one_row(tmp_path, out, [("wide.png", question), ("square.png", question)])
    assert wide["visual_tokens"] == 3 * 64 and square["visual_tokens"] == 5 * 64
    assert wide["flops"]["vision"] < square["flops"]["vision"]
    for part in ("vision", "projector", "llm", "total"):
        assert both["flops"][part] == pytest.approx((wide["flops"][part] + square["flops"][part]) / 2)
    assert both["layer_tokens"] == [
        (w + s) / 2 for w, s in zip(wide["layer_tokens"], square["layer_tokens"], strict=True)
    ]


def test_each_question_costs_its_own_words(tmp_path):
    """A short question and a long one asked together cost the mean of each alone: the LLM's
    FLOPs and its sequence per layer follow each question's prompt, not the first one's."""
    from models.pretrained import shipped_path

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "img" / "red.png")
    base = shipped_path("tiny-llava")
    short, long = "What colour is the dot?", "How many objects are there and what colour is the dot?"
    one = _one_row(tmp_path, base, [("red.png", short)], baseline=None)  # the base's own row
    other = _one_row(tmp_path, base, [("red.png", long)], baseline=None)
    both = _one_row(tmp_path, base, [("red.png", short), ("red.png", long)], baseline=None)
    assert other["layer_tokens"][0] > one["layer_tokens"][0]  # the longer prompt
    assert other["flops"]["vision"] == one["flops"]["vision"]  # the same image
    for part in ("llm", "total"):
        assert both["flops"][part] == pytest.approx((one["flops"][part] + other["flops"][part]) / 2)
    assert both["layer_tokens"] == [
        (a + b) / 2 for a, b in zip(one["layer_tokens"], other["layer_tokens"], strict=True)
    ]


@pytest.mark.parametrize(
    "compressor",
    [
        None,
        ComponentSpec("avgpool2d", {"stride": 2}),
        ComponentSpec("random", {"tokens": 9}),
        ComponentSpec("divprune", {"tokens": 9}),
        ComponentSpec("visionzip", {"tokens": 9}),
        ComponentSpec("fastv", {"layer": 1, "tokens": 9}),
        ComponentSpec("pdrop", {"layers": [1, 2], "keep": 0.5}),
    ],
    ids=lambda c: "none" if c is None else c.name,
)
def test_batch_of_three_answers_as_one_by_one(synth_dirs, compressor):
    """Different prompt lengths padded into one batch give the answers of three separate calls."""
    from data.shards import ShardIndex
    from train.accuracy import synthetic_questions

    built = build("tiny", compressors=[compressor] if compressor else [], tiny=TEST_TINY, seed=3)
    everything = synthetic_questions(ShardIndex(synth_dirs / "test"), limit=3)
    picked = []  # three images, questions of three lengths (so the batch is ragged)
    for q in everything.questions:
        if q.image not in {p.image for p in picked} and len(q.text) not in {len(p.text) for p in picked}:
            picked.append(q)
    assert len(picked) == 3
    questions = QuestionSet(picked, everything.read_image)
    batched = answer_questions(built.model, built.tokenizer, questions, 64, batch_size=3, progress=False)
    single = answer_questions(built.model, built.tokenizer, questions, 64, batch_size=1, progress=False)
    assert batched == single


def test_budget_parameters_come_from_the_registry():
    """Every training-free baseline says how to hit a budget; evaluate, the recipe check and the
    CLI read the registry."""
    assert baselines() == {
        "downsample": "downsample",
        "visionzip": "visionzip",
        "divprune": "divprune",
        "pooling": "avgpool2d",
        "random": "random",
        "fastv": "fastv",
        "pdrop": "pdrop",
    }

    def params(name, budget, layers):
        dims = ModelDims(128, 4, 4, 8, 128, layers, 4)
        return component_class(name).budget_params(budget, 64, dims)

    assert params("avgpool2d", 16, 4) == {"stride": 2}
    assert params("avgpool2d", 7, 4) is None  # not a square grid
    assert params("downsample", 16, 4) == {"side": 4} and params("downsample", 36, 4) == {"side": 6}
    assert params("downsample", 7, 4) is None and params("downsample", 81, 4) is None
    assert params("random", 7, 4) == {"tokens": 7} and params("visionzip", 7, 4) == {"tokens": 7}
    assert params("fastv", 16, 4) == {"layer": 2, "tokens": 16}
    pdrop = params("pdrop", 32, 8)
    bounds, keep = [0, *pdrop["layers"], 8], pdrop["keep"]
    mean = sum(64 * keep**i * (bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)) / 8
    assert mean == pytest.approx(32, abs=0.01)
    assert params("pdrop", 4, 4) is None  # layer 0..1 always sees all 64
    assert params("tokenpacker", 16, 4) is None  # a trained projector is not a baseline


def test_live_tensor_tracker_measures_peak_not_total():
    with LiveTensorBytes() as tracker:
        for _ in range(5):
            x = torch.ones(1024, 256)  # 1 MiB, freed on the next iteration
            del x
    assert tracker.peak == 1024 * 256 * 4 and tracker.current == 0


def valid_png(path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    length, kind = struct.unpack(">I4s", data[8:16])
    crc = struct.unpack(">I", data[16 + length : 20 + length])[0]
    return kind == b"IHDR" and zlib.crc32(data[12 : 16 + length]) == crc


@pytest.mark.slow
def test_vtc_evaluate_writes_the_report(tmp_path):
    from models.pretrained import shipped_path
    from train.cli import main

    out = tmp_path / "report"
    args = [
        "evaluate",
        str(shipped_path("tiny-llava")),  # the shipped base, a llava-hf folder
        "--out",
        str(out),
        "--limit",
        "4",
        "--repeats",
        "1",
        "--latency-batch",
        "2",
    ]
    assert main([*args, "--baselines", "pooling,fastv,visionzip", "--tokens", "16"]) == 0
    report = json.loads((out / "eval.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("baseline", None), ("pooling", 16), ("fastv", 16), ("visionzip", 16)}
    base = rows[("baseline", None)]
    assert (
        base["accuracy"] > 0.5
        and base["accuracy_kept"] == 1.0
        and base["speedup_analytic"] == 1.0
        and base["count"] == 4 * len(FAMILIES)
    )
    assert rows[("pooling", 16)]["visual_tokens"] == 16 and rows[("visionzip", 16)]["visual_tokens"] == 16
    assert base["agreement"] == 1.0 and all(0 <= r["agreement"] <= 1 for r in rows.values())
    fastv = rows[("fastv", 16)]  # 4 LLM layers, pruned after layer 2: layers 0-2 see all 64, 3 keeps 16
    assert fastv["visual_tokens"] == 64 and fastv["visual_tokens_layer_mean"] == 52
    assert rows[("pooling", 16)]["flops"]["llm"] < base["flops"]["llm"]
    for row in rows.values():
        assert row["prefill_ms_batch1"] > 0 and row["prefill_ms_batchN"] > 0 and row["peak_memory_mb"] > 0
        assert row["decode_tokens_per_s_batch1"] > 0 and row["decode_tokens_per_s_batchN"] > 0
    assert "| pooling | 16 |" in (out / "eval.md").read_text()
    assert valid_png(out / "eval.png")
    # accuracy against tokens, FLOPs and the measured latency; untimed rows have no latency axis
    from train.evaluation.report import figure

    labels = [ax.get_xlabel() for ax in figure(report).axes]
    assert labels[2] == "prefill ms at batch 2 (measured)" and len(labels) == 3
    line = next(ln for ln in figure(report).axes[2].lines if ln.get_label() == "baseline")
    assert list(line.get_xdata()) == [base["prefill_ms_batchN"]]
    untimed = {
        **report,
        "rows": [{k: v for k, v in r.items() if "prefill_ms" not in k} for r in report["rows"]],
    }
    assert len(figure(untimed).axes) == 2


def test_sources_resolve_to_a_baseline(tmp_path):
    from models.build import save_as_llava_hf
    from train.evaluation.sources import resolve_source

    save_as_llava_hf(build("tiny", tiny=TEST_TINY), tmp_path / "llava")
    source = resolve_source(str(tmp_path / "llava"))
    assert source.model is None and source.base_dir == str(tmp_path / "llava")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        resolve_source(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory, recipe, vtc export or llava-hf folder"):
        resolve_source(str(tmp_path / "empty"))


def test_hard_subset_is_what_the_downsampled_image_gets_wrong():
    from train.evaluation.report import add_hard_subsets, markdown

    rows = [
        {"method": "baseline", "budget": None},
        {"method": "downsample", "budget": 16},
        {"method": "pooling", "budget": 16},
        {"method": "pooling", "budget": 4},
    ]
    right = [
        {"a": True, "b": True, "c": True, "d": False},
        {"a": True, "b": False, "c": False, "d": False},  # hard @16: b, c, d
        {"a": False, "b": True, "c": False, "d": True},
        {"a": True, "b": True, "c": True, "d": True},
    ]
    add_hard_subsets(rows, right)
    assert rows[0]["hard"] == {"16": {"questions": 3, "accuracy": pytest.approx(2 / 3)}}
    assert rows[1]["hard"]["16"]["accuracy"] == 0.0
    assert rows[2]["hard"]["16"]["accuracy"] == pytest.approx(2 / 3)
    assert "hard" not in rows[3]  # no down-sampled row at budget 4
    for row in rows:
        row.update(
            visual_tokens=1.0, visual_tokens_layer_mean=1.0, accuracy=0.5, accuracy_kept=1.0,
            per_family={"colour": 0.5}, flops={"total": 1e9}, speedup_analytic=1.0,
        )  # fmt: skip
    report = {
        "source": "s",
        "questions": "q",
        "question_count": 4,
        "machine": {"device": "cpu", "threads": 1, "torch": "t"},
    }
    table = markdown({**report, "rows": rows})
    assert "hard @16 (3 q)" in table and "| pooling | 16 |" in table


def test_a_setting_changed_at_test_time_is_a_row_compared_question_by_question(tmp_path):
    """`--setting falcon.reatten=false`: the model under test again with ReAtten switched off
    (its weights kept), scored beside it and compared with it question by question."""
    from models.export import load_pretrained
    from tests.conftest import falcon_export
    from train.evaluate import Settings, evaluate
    from train.evaluation.sources import SettingAtTest

    out = falcon_export(tmp_path / "export")
    off = SettingAtTest.parse("falcon.reatten=false").applied(lambda: load_pretrained(out))()
    assert off.model.compressors[0].config.reatten is False
    report = evaluate(
        str(out), [], [16], settings=Settings(limit=4, timing=False), test_settings=["falcon.reatten=false"]
    )
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"baseline", "model", "model[falcon.reatten=false]"}
    model, changed = rows["model"], rows["model[falcon.reatten=false]"]
    pair = changed["vs_model"]
    assert pair["questions"] == model["count"] == changed["count"] == 4 * len(FAMILIES)
    right = lambda row: round(row["per_question"] * row["count"])  # noqa: E731
    assert right(model) - right(changed) == pair["right_by_model_only"] - pair["right_by_this_only"]
    assert 0 < pair["p"] <= 1 and "exact McNemar p" in (tmp_path / "export" / "eval.md").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("falcon.reatten", "give COMPONENT.KEY=VALUE"),
        ("falcn.reatten=false", "unknown"),
        ("falcon.registers=8", "can change at test time: reatten, reatten_ramp"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(text, message):
    from train.evaluation.sources import SettingAtTest

    with pytest.raises(UserError, match=message):
        SettingAtTest.parse(text)


def test_a_report_folder_that_cannot_be_written_is_refused_before_any_row(tmp_path):
    from models.pretrained import shipped_path
    from train.evaluate import evaluate

    (tmp_path / "eval.json").write_text("{}")
    with pytest.raises(UserError, match="eval.json is a file, not a folder for the report"):
        evaluate(shipped_path("tiny-llava"), [], out_dir=tmp_path / "eval.json")
    with pytest.raises(UserError, match=r"cannot write the report there \(Not a directory\); give --out"):
        evaluate(shipped_path("tiny-llava"), [], out_dir=tmp_path / "eval.json" / "report")


def test_a_setting_value_the_component_refuses_is_named():
    from train.evaluation.sources import SettingAtTest

    dims = build("tiny", tiny=TEST_TINY).model.dims
    with pytest.raises(UserError, match="reatten_ramp"):
        SettingAtTest.parse("falcon.reatten_ramp=[2, 3]").check(dims)
    with pytest.raises(UserError, match="expected bool"):
        SettingAtTest.parse("falcon.reatten=maybe").check(dims)
    SettingAtTest.parse("falcon.reatten=false").check(dims)  # a good one passes


def test_a_llava_hf_folder_is_prompted_in_the_template_given(tmp_path):
    """A llava-hf folder records no template: vicuna_v1 unless `--template chat` (with its
    system prompt) says how it was tuned; every row is then prompted so, and the report says it."""
    from models.build import save_as_llava_hf
    from tests.test_templates import LLAMA3_LIKE
    from train.cli import main

    built = build("tiny", tiny=TEST_TINY)
    built.tokenizer.chat_template = LLAMA3_LIKE
    save_as_llava_hf(built, tmp_path / "llava")
    common = ["evaluate", str(tmp_path / "llava"), "--limit", "2", "--no-timing", "--baselines", "pooling"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "eval.json").read_text())["template"]["name"] == "vicuna_v1"
    chat = ["--template", "chat", "--system-prompt", "Be brief .", "--out", str(tmp_path / "chat")]
    assert main([*common, *chat]) == 0
    report = json.loads((tmp_path / "chat" / "eval.json").read_text())
    assert report["template"] == {"name": "chat", "system": "Be brief .", "jinja": None}
    assert "prompted in the `chat` template" in (tmp_path / "chat" / "eval.md").read_text()
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    assert [r["method"] for r in report["rows"]] == [r["method"] for r in plain["rows"]]  # same rows
    assert main([*common, "--system-prompt", "Be brief .", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "given.jinja").write_text("{{ bos_token }}" + LLAMA3_LIKE)
    given = ["--template", "chat", "--chat-template", str(tmp_path / "given.jinja")]
    assert main([*common, *given, "--out", str(tmp_path / "given")]) == 0
    recorded = json.loads((tmp_path / "given" / "eval.json").read_text())["template"]
    assert recorded == {"name": "chat", "system": None, "jinja": "{{ bos_token }}" + LLAMA3_LIKE}
    assert (
        main([*common, "--chat-template", str(tmp_path / "given.jinja"), "--out", str(tmp_path / "y")]) == 2
    )


def test_rows_run_in_the_precision_and_on_the_device_given(tmp_path, monkeypatch):
    """`--dtype bfloat16`: every row runs in bfloat16 (its prefill's tensors take about half the
    memory they take in float32), but for the rotary `inv_freq`, kept in float32 as
    `from_pretrained` keeps it, and the report says so; a device this machine lacks, or an
    unknown one, is refused before any weights load."""
    import train.evaluate
    from models.build import floating_buffers, save_as_llava_hf
    from train.cli import main

    answering = train.evaluate.answer_questions
    seen = []  # (parameter dtypes, floating buffer dtypes) of each row as it answers

    def recording(model, *args, **kwargs):
        buffers = floating_buffers(model).values()
        seen.append(({p.dtype for p in model.parameters()}, {b.dtype for b in buffers}))
        return answering(model, *args, **kwargs)

    monkeypatch.setattr(train.evaluate, "answer_questions", recording)

    save_as_llava_hf(build("tiny", tiny=TEST_TINY), tmp_path / "llava")
    common = ["evaluate", str(tmp_path / "llava"), "--limit", "2", "--baselines", "pooling", "--tokens", "16"]
    common += ["--repeats", "1", "--latency-batch", "2"]
    reports = {}
    for dtype in ("float32", "bfloat16"):
        seen.clear()
        assert main([*common, "--dtype", dtype, "--device", "cpu", "--out", str(tmp_path / dtype)]) == 0
        reports[dtype] = json.loads((tmp_path / dtype / "eval.json").read_text())
        if dtype == "bfloat16":
            assert seen and all(p == {torch.bfloat16} and b == {torch.float32} for p, b in seen)
    half, full = reports["bfloat16"], reports["float32"]
    assert half["settings"]["dtype"] == "bfloat16" and half["machine"]["device"] == "cpu"
    assert "cpu in bfloat16" in (tmp_path / "bfloat16" / "eval.md").read_text()
    for half_row, full_row in zip(half["rows"], full["rows"], strict=True):
        assert half_row["peak_memory_mb"] < 0.7 * full_row["peak_memory_mb"]
    for device in ("cuda:7", "tpu"):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        assert main([*common, "--device", device, "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_default_precision_is_float16_on_a_gpu_and_float32_on_a_cpu(monkeypatch):
    """`--dtype auto` (the default) names the precision LLaVA evaluates in on a GPU, float16, and
    float32 on a CPU; the report records the name it chose; a named precision is kept as given."""
    from train.evaluation.measure import Settings

    assert Settings().dtype == "auto"
    assert Settings(device="cpu").resolved().dtype == "float32"
    assert Settings(device="cpu").placement() == (torch.device("cpu"), torch.float32)
    assert Settings(device="cpu", dtype="bfloat16").resolved().dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as torch sees it
    assert Settings().resolved().dtype == "float16"
    assert Settings().placement() == (torch.device("cuda"), torch.float16)
    assert Settings(device="cpu").resolved().dtype == "float32"  # a GPU machine told to use its CPU
    assert Settings(dtype="float32").resolved().dtype == "float32"
    with pytest.raises(UserError, match="dtype must be auto or one of"):
        Settings(dtype="fp8").resolved()


def test_a_shipped_base_is_evaluated_by_name_and_its_report_stays_out_of_the_package(tmp_path, monkeypatch):
    """`vtc evaluate tiny-llava` (the name a recipe's model.base takes) or its folder: the shipped
    base, checked against its recorded hashes, reported under ./checkpoints/eval/NAME instead of
    inside vtc's package; a copy of that folder elsewhere is an ordinary llava-hf folder."""
    import shutil

    from models.pretrained import shipped_path
    from train.evaluation.sources import resolve_source

    monkeypatch.chdir(tmp_path)
    folder = shipped_path("tiny-llava")
    for target in ("tiny-llava", str(folder)):
        source = resolve_source(target)
        assert source.model is None and Path(source.base_dir) == folder  # the base is the baseline
        assert source.out_dir == tmp_path / "checkpoints" / "eval" / "tiny-llava"
        assert source.description.startswith("shipped base tiny-llava")
    copy = tmp_path / "mine" / "tiny-llava"
    shutil.copytree(folder, copy)
    assert resolve_source(str(copy)).out_dir == copy
    with pytest.raises(FileNotFoundError, match="nor a recipe file, shipped recipe name or shipped base"):
        resolve_source("tiny-llava-9l")


def test_a_budget_a_baseline_cannot_keep_is_left_out_with_the_reason(capsys):
    """A training-free baseline at more tokens than the base has, or at a count it cannot keep
    exactly (pooling to a non-square count), is left out, and the line says which."""
    from train.evaluation.sources import methods_for, resolve_source

    source = resolve_source("tiny-llava")
    methods = methods_for(source, ["pooling"], [1000, 15, 16], baseline=None)
    assert [(m.label, m.budget) for m in methods] == [("pooling", 16)]
    out = capsys.readouterr().out
    assert "pooling at 1000 of 64 visual tokens: the base has only 64; left out" in out
    assert "pooling at 15 of 64 visual tokens: not a count it can keep exactly; left out" in out


def test_the_baseline_row_is_another_source_or_none(tmp_path, capsys):
    """`--baseline none`: no baseline row; the model is the reference (kept and same answers
    100 %) and eval.md says so. `--baseline OTHER`: OTHER is the baseline row, answering as it
    does when evaluated on its own, and the training-free baselines go on it; the model's
    accuracy kept is then against it. A base has no model to stand without a baseline, and a
    baseline that does not exist, or whose tower takes other images, is named before any
    weights load."""
    from dataclasses import replace

    from models.build import save_as_llava_hf
    from models.export import export
    from models.pretrained import shipped_path
    from train.cli import main

    base, other = str(shipped_path("tiny-llava")), str(shipped_path("tiny-llava-8l"))
    spec = ComponentSpec("avgpool2d", {"stride": 2})
    built = build(base, compressors=[spec])
    out = export(built, tmp_path / "export", ComponentSpec("mlp2x_gelu"), [spec], base, compressor_only=True)
    common = ["evaluate", str(out), "--limit", "2", "--no-timing", "--tokens", "16"]

    def report(name: str, *args: str) -> dict:
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "eval.json").read_text())

    alone = report("none", *common, "--baselines", "", "--baseline", "none")
    assert alone["baseline"] == "none" and [r["method"] for r in alone["rows"]] == ["model"]
    assert alone["rows"][0]["accuracy_kept"] == alone["rows"][0]["agreement"] == 1.0
    assert "kept = vs. `model` (no baseline row)" in (tmp_path / "none" / "eval.md").read_text()

    against = report("other", *common, "--baselines", "pooling", "--baseline", other)
    own = report(
        "own", "evaluate", other, "--limit", "2", "--no-timing", "--tokens", "16", "--baselines", "pooling"
    )
    rows, own_rows = ({r["method"]: r for r in r_["rows"]} for r_ in (against, own))
    assert (
        list(rows) == ["baseline", "model", "pooling"]
        and against["baseline"] == f"shipped base tiny-llava-8l ({other})"
    )
    for method in ("baseline", "pooling"):  # pooling on the source's own base answers otherwise
        for key in ("per_family", "flops"):
            assert rows[method][key] == own_rows[method][key]
    model = rows["model"]
    assert model["accuracy_kept"] == pytest.approx(model["accuracy"] / own_rows["baseline"]["accuracy"])
    assert model["per_family"] == alone["rows"][0]["per_family"]

    assert main(["evaluate", base, "--baseline", "none", "--out", str(tmp_path / "x")]) == 2
    assert "is a base, with no model to measure" in capsys.readouterr().err
    assert main([*common, "--baseline", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "--baseline: " in capsys.readouterr().err and not (tmp_path / "x").exists()
    save_as_llava_hf(build("tiny", tiny=replace(TEST_TINY, image_size=96)), tmp_path / "96px")
    assert main([*common, "--baseline", str(tmp_path / "96px"), "--out", str(tmp_path / "x")]) == 2
    assert "its tower takes 96 px images" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_interrupted_evaluation_measures_only_the_rows_it_had_not(tmp_path, monkeypatch, capsys):
    """Rows are saved as they are measured: after Ctrl-C the same command measures only the rest
    and writes the report a whole evaluation writes; saved rows go once the report is written.
    A model file changed, not just written again, or --fresh, measures every row again."""
    from safetensors.torch import load_file, save_file

    import train.evaluate as evaluation
    from data.locks import held_alone
    from models.export import export
    from models.pretrained import shipped_path
    from train.cli import main
    from train.evaluation.saved_rows import FOLDER

    base = str(shipped_path("tiny-llava"))
    spec = ComponentSpec("avgpool2d", {"stride": 2})
    model = export(
        build(base, compressors=[spec]), tmp_path / "export", ComponentSpec("mlp2x_gelu"), [spec], base
    )
    measured, stop_after, real = [], [None], evaluation.measure

    def measure(method, *args):
        if len(measured) == stop_after[0]:
            raise KeyboardInterrupt
        measured.append((method.label, method.budget))
        return real(method, *args)

    monkeypatch.setattr(evaluation, "measure", measure)
    out = tmp_path / "report"
    common = [
        "evaluate",
        str(model),
        "--limit",
        "2",
        "--no-timing",
        "--tokens",
        "16",
        "--baselines",
        "pooling,fastv",
    ]
    every = [("baseline", None), ("model", None), ("pooling", 16), ("fastv", 16)]

    def run(*flags: str, stop: int | None = None) -> int:
        measured.clear()
        stop_after[0] = stop
        return main([*common, "--out", str(out), *flags])

    assert run(stop=2) == 130 and measured == every[:2] and not (out / "eval.json").exists()
    assert f"evaluate stopped; kept in {out / FOLDER}: the 2 rows measured so far;" in capsys.readouterr().out
    with held_alone(out / f"{FOLDER}.lock", "held"):  # another evaluation into the folder
        assert run() == 2 and measured == [] and "another vtc evaluate is writing" in capsys.readouterr().err
    assert run() == 0 and measured == every[2:]
    assert "2 of 4 rows were measured by an interrupted evaluation" in capsys.readouterr().out
    resumed = json.loads((out / "eval.json").read_text())
    assert not (out / FOLDER).exists() and not (out / f"{FOLDER}.lock").exists()
    assert run("--fresh") == 0 and measured == every
    assert json.loads((out / "eval.json").read_text())["rows"] == resumed["rows"]

    assert run(stop=3) == 130 and run("--fresh", stop=1) == 130 and measured == every[:1]  # --fresh drops 3
    weights = model / "components.safetensors"  # the projector
    weights.write_bytes(weights.read_bytes())  # written again unchanged (as `vtc resume` does)
    assert run(stop=2) == 130 and measured == every[1:3]
    projector = load_file(weights)
    projector["projector.linear_2.bias"][0] += 1e-3
    save_file(projector, weights)
    assert run() == 0 and measured == every  # the model changed: no saved row is its row


def test_compare_rows_are_told_apart_by_the_folders_above_them(tmp_path):
    """Two runs' `final/` are two rows (and two answer files), named by as many folders above
    them as tell them apart and from the other rows; one source given twice is refused."""
    from train.evaluation.sources import compare_labels

    a, b, c = (str(tmp_path / p) for p in ("a/x/final", "b/x/final", "c/other"))
    assert compare_labels([a, b, c], {"baseline", "model"}) == ["a/x/final", "b/x/final", "other"]
    assert compare_labels([str(tmp_path / "runs/model")], {"baseline", "model"}) == ["runs/model"]
    with pytest.raises(UserError, match="--compare: .*a/x/final/ given twice"):
        compare_labels([a, a + "/"])


@pytest.mark.slow
def test_sigterm_to_an_evaluation_keeps_its_measured_rows(tmp_path):
    """A scheduler's SIGTERM ends `vtc evaluate` as Ctrl-C does (exit 143): the rows measured so
    far stay for the same command to take back; its lock goes."""
    import signal
    import subprocess
    import sys
    import time

    from models.pretrained import shipped_path
    from train.evaluation.saved_rows import FOLDER

    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "train.cli", "evaluate", str(shipped_path("tiny-llava")), "--out", str(out)]
    cmd += ["--limit", "40", "--no-timing", "--baselines", "pooling,random,divprune", "--tokens", "16,4"]
    evaluation = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / FOLDER).glob("*.json")) and time.time() < deadline:
        time.sleep(0.1)
    evaluation.send_signal(signal.SIGTERM)
    said, err = evaluation.communicate(timeout=120)
    assert evaluation.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert (
        "vtc: terminated (SIGTERM)" in err
        and "evaluate stopped; kept in" in said
        and "measured so far" in said
    )
    assert list((out / FOLDER).glob("*.json")) and not (out / f"{FOLDER}.lock").exists()


def test_saved_rows_know_a_question_files_images(tmp_path):
    """Rows saved for a question file are taken back only while its images are the same: one
    replaced changes the digest; a missing one (its questions skipped) is part of it too."""
    from train.evaluation.saved_rows import questions_digest

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    lines = [
        {"question_id": 1, "image": "a.png", "text": "q"},
        {"question_id": 2, "image": "gone.png", "text": "q"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = questions_digest(file_questions(tmp_path / "q.jsonl", tmp_path / "img"))
    assert questions_digest(file_questions(tmp_path / "q.jsonl", tmp_path / "img")) == before
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "img" / "a.png")
    assert questions_digest(file_questions(tmp_path / "q.jsonl", tmp_path / "img")) != before


def test_a_row_stopped_half_way_goes_on_from_the_questions_it_had_not_answered(tmp_path, monkeypatch, capsys):
    """The row under way records its answers batch by batch: stopped half-way, the same command
    asks only the questions it had not answered, and the report is the one a whole evaluation
    writes, its components' counts (`statistics`) too. A row with a component that counts but
    cannot save its counts starts over."""
    import train.evaluate as evaluation
    from models.compressors import component_class
    from models.compressors.base import Compressor
    from models.pretrained import shipped_path
    from train.cli import main

    calls, batches, stop_at, real = [], [], [None], evaluation.answer_questions

    def answer_questions(*args, known=None, on_answers=None, desc="", **kwargs):
        calls.append((desc, len(known or {})))

        def answered(batch):
            if on_answers is not None:
                on_answers(batch)
            batches.append((desc, set(batch)))
            if len(batches) == stop_at[0]:
                raise KeyboardInterrupt

        return real(*args, known=known, on_answers=answered, desc=desc, **kwargs)

    monkeypatch.setattr(evaluation, "answer_questions", answer_questions)
    pooling, forward = component_class("avgpool2d"), component_class("avgpool2d").forward

    def counting_forward(self, state):  # the pooling row counts the images it pools, as DyVTE its exits
        self.pooled += len(state.num_visual)
        return forward(self, state)

    monkeypatch.setattr(pooling, "forward", counting_forward)
    monkeypatch.setattr(pooling, "reset_statistics", lambda self: setattr(self, "pooled", 0))
    monkeypatch.setattr(pooling, "statistics", lambda self: {"pooled": self.pooled})
    monkeypatch.setattr(pooling, "statistics_state", lambda self: {"pooled": self.pooled})
    monkeypatch.setattr(
        pooling, "load_statistics_state", lambda self, state: setattr(self, "pooled", state["pooled"])
    )
    out = tmp_path / "report"
    args = ["evaluate", str(shipped_path("tiny-llava")), "--limit", "4", "--batch-size", "4", "--no-timing"]
    args += ["--tokens", "16", "--baselines", "pooling", "--out", str(out)]

    def run(*flags: str, stop: int | None = None) -> int:
        calls.clear(), batches.clear()
        stop_at[0] = stop
        return main([*args, *flags])

    # 20 questions, 5 batches a row: stopped in the pooling row's second batch
    assert run(stop=7) == 130
    before = set().union(*(ids for desc, ids in batches if desc == "pooling @16"))
    assert len(before) == 8
    assert ": the 1 row measured so far and 8 answers of the row under way;" in capsys.readouterr().out
    assert run() == 0 and calls == [("pooling @16", 8)]  # the baseline row was kept whole
    again = set().union(*(ids for _, ids in batches))
    assert not again & before and len(again | before) == 20
    assert "pooling: 8 of 20 questions were answered before; kept" in capsys.readouterr().out
    resumed = json.loads((out / "eval.json").read_text())["rows"]
    assert resumed[1]["statistics"] == {"avgpool2d": {"pooled": 20}}  # 8 counted before the stop, 12 after
    assert run("--fresh") == 0 and [n for _, n in calls] == [0, 0]
    assert json.loads((out / "eval.json").read_text())["rows"] == resumed

    # a component whose counts cannot be saved has its row measured again from the first question
    monkeypatch.setattr(pooling, "statistics_state", Compressor.statistics_state)
    assert run(stop=7) == 130 and run() == 0 and calls == [("pooling @16", 0)]
    assert json.loads((out / "eval.json").read_text())["rows"] == resumed
