"""The lmms-eval plugin answers exactly as `vtc evaluate` does, on a local lmms-eval task built
from synthetic data (offline; needs the `lmms` extra, skipped without it)."""

import json
import textwrap

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402

from data.synth import final_answer, make_sample  # noqa: E402
from models.pretrained import shipped_path  # noqa: E402

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["text"]
"""


def write_questions(root, images: int = 3):
    """A LLaVA question file (for `vtc evaluate --questions`) and the same questions as an
    lmms-eval task folder (`--include_path`)."""
    (root / "images").mkdir()
    rows = []
    for index in range(images):
        sample = make_sample("test", index, 0, 64, 4)
        name = f"{index}.png"
        sample["image"].save(root / "images" / name)
        convs = sample["conversations"]
        for turn in range(0, len(convs), 2):
            text = convs[turn]["value"].replace("<image>", "").strip()
            answer = final_answer(convs[turn + 1]["value"])
            rows.append(
                {"question_id": f"{index}-{turn // 2}", "image": name, "text": text, "answer": answer}
            )
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = root / "task"
    task.mkdir()
    lines = [{**r, "image": str(root / "images" / r["image"])} for r in rows]
    (task / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (task / "utils.py").write_text(TASK_UTILS)
    (task / "vtc_synth.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: vtc_synth
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {task / "data.jsonl"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 8
              until: ["</s>"]
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return rows


def lmms_answers(root, model_args: str) -> dict[str, str]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(
        model="vtc",
        model_args=model_args,
        tasks=["vtc_synth"],
        task_manager=TaskManager(include_path=str(root / "task")),
        log_samples=True,
        batch_size=4,
    )
    samples = results["samples"]["vtc_synth"]
    return {s["doc"]["question_id"]: s["resps"][0][0] for s in samples}


@pytest.mark.slow
def test_lmms_eval_plugin_answers_as_vtc_evaluate(tmp_path, monkeypatch):
    from train.evaluate import evaluate
    from train.evaluation.measure import Settings

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = write_questions(tmp_path)
    base = str(shipped_path("tiny-llava"))
    evaluate(
        base,
        ["pooling"],
        [16],
        out_dir=tmp_path / "report",
        questions_file=str(tmp_path / "questions.jsonl"),
        images_dir=str(tmp_path / "images"),
        settings=Settings(timing=False),
    )

    def vtc_answers(name):
        lines = (tmp_path / "report" / f"answers-{name}.jsonl").read_text().splitlines()
        return {row["question_id"]: row["text"] for row in map(json.loads, lines)}

    for model_args, name in (
        (f"pretrained={base}", "baseline"),
        (f"pretrained={base},compressor=pooling,tokens=16", "pooling-16"),
    ):
        got, expected = lmms_answers(tmp_path, model_args), vtc_answers(name)
        assert set(got) == {r["question_id"] for r in rows}
        assert got == expected, name
    # the two models differ, so the comparison can fail
    assert vtc_answers("baseline") != vtc_answers("pooling-16")


def test_plugin_refuses_what_it_cannot_answer():
    from train.evaluation.lmms import VtcLmms, cut_at

    assert cut_at("b3 . red</s> junk", ["</s>"]) == "b3 . red"
    base = str(shipped_path("tiny-llava"))
    with pytest.raises(ValueError, match="unknown model_args conv_template"):
        VtcLmms(pretrained=base, conv_template="x")
    from data.errors import UserError

    with pytest.raises(UserError, match="cannot keep exactly 10 of 64"):
        VtcLmms(pretrained=base, compressor="pooling", tokens=10)
    with pytest.raises(UserError, match="not a training-free baseline"):
        VtcLmms(pretrained=base, compressor="tokenpacker", tokens=16)
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        VtcLmms(pretrained=base).loglikelihood([])
    with pytest.raises(UserError, match="a system prompt goes with the chat template"):
        VtcLmms(pretrained=base, system_prompt="Be brief .")
    assert VtcLmms(pretrained=base).built.template.name == "vicuna_v1"
    chat = VtcLmms(pretrained=base, template="chat", system_prompt="Be brief .").built.template
    assert (chat.name, chat.system) == ("chat", "Be brief .")
    with pytest.raises(UserError, match="cannot read"):
        VtcLmms(pretrained=base, template="chat", chat_template="/no/such.jinja")


def test_a_setting_in_model_args_reaches_the_component(tmp_path):
    """`setting=falcon.reatten=false`, through lmms-eval's own model_args parser (which splits
    each argument at its first `=`), as `vtc evaluate --setting` changes it."""
    from lmms_eval.utils import simple_parse_args_string

    from data.errors import UserError
    from tests.conftest import falcon_export
    from train.evaluation.lmms import VtcLmms

    out = falcon_export(tmp_path / "falcon")
    args = simple_parse_args_string(f"pretrained={out},setting=falcon.reatten=false")
    assert VtcLmms(**args).built.model.compressors[0].config.reatten is False
    assert VtcLmms(pretrained=str(out)).built.model.compressors[0].config.reatten is True
    with pytest.raises(UserError, match="has no falcon"):
        VtcLmms(pretrained=str(shipped_path("tiny-llava")), setting="falcon.reatten=false")


def test_plugin_builds_in_the_precision_given_and_keeps_float32_buffers():
    """`dtype=bfloat16`: the model is built in bfloat16 (the base is never read in at float32)
    and placed, its floating buffers (the rotary `inv_freq`) left in float32 as
    `from_pretrained` leaves them."""
    from models.build import floating_buffers
    from train.evaluation.lmms import VtcLmms

    plugin = VtcLmms(
        pretrained=str(shipped_path("tiny-llava")), compressor="pooling", tokens=16, dtype="bfloat16"
    )
    model = plugin.built.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the HF projector vtc's replaces is not in `model`: only the build could have cast it
    assert {p.dtype for p in plugin.built.hf.parameters()} == {torch.bfloat16}
    buffers = floating_buffers(model)
    assert buffers and {b.dtype for b in buffers.values()} == {torch.float32}


def test_each_process_of_a_multi_gpu_launch_takes_its_own_gpu(monkeypatch):
    """`accelerate launch -m lmms_eval` starts one process per GPU and splits the questions
    between them: each must load the model onto its own GPU, not all onto cuda:0."""
    from train.evaluation.lmms import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert [process_device(d) for d in (None, "cuda", "cuda:1", "cpu")] == [
        "cuda:3",
        "cuda:3",
        "cuda:1",
        "cpu",
    ]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: as given (None: cuda when there is one)
    assert process_device(None) is None and process_device("cuda") == "cuda"
