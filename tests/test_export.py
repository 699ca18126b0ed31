"""vtc export → load_pretrained gives the training-time model back (LoRA merged or not)."""

import json

import pytest
import torch

from data.errors import UserError
from models.build import ComponentSpec, build
from models.export import load_pretrained
from train.accuracy import evaluate_accuracy
from train.datamodule import split_shards
from train.export import export_run, rebuild_run
from train.recipe import load_recipe
from train.run import run_recipe


def logits(built, seed=0):
    torch.manual_seed(seed)
    tok, model = built.tokenizer, built.model.eval()
    ids = torch.tensor(
        [
            [tok.bos_token_id, model.image_token_id]
            + tok("What colour is the dot ?", add_special_tokens=False).input_ids
        ]
    )
    with torch.no_grad():
        return model(
            ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(1, 3, 64, 64), return_logits=True
        ).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    recipe = load_recipe(
        "tiny/smoke",
        [
            f"output={tmp / 'run'}",
            f"data.cache_dir={tmp / 'data'}",
            "stages.1.train.llm=lora",
            "stages.1.steps=6",
            "model.projector={name: tokenpacker, scale: 2}",
        ],
    )
    metrics = run_recipe(recipe)
    return tmp, recipe, metrics


@pytest.mark.slow
def test_rebuilt_run_reproduces_its_own_evaluation(lora_run):
    tmp, recipe, metrics = lora_run
    built, *_ = rebuild_run(tmp / "run")
    again = evaluate_accuracy(
        built.model,
        built.tokenizer,
        split_shards(recipe.data, "test"),
        64,
        limit=recipe.eval.limit,
        progress=False,
    )
    assert again["per_family"] == metrics["per_family"]


@pytest.mark.slow
def test_export_with_merged_lora_loads_back_with_the_same_logits(lora_run):
    tmp, _, _ = lora_run
    trained = logits(rebuild_run(tmp / "run")[0])
    out = export_run(tmp / "run", tmp / "exported", merge=True)
    meta = json.loads((out / "vtc.json").read_text())
    assert meta["projector"]["name"] == "tokenpacker" and (out / "config.json").is_file()
    loaded = load_pretrained(out)
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    torch.testing.assert_close(logits(loaded), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_with_unmerged_lora_loads_back_with_identical_logits(lora_run):
    tmp, recipe, _ = lora_run
    trained = logits(rebuild_run(tmp / "run")[0])
    out = export_run(tmp / "run", tmp / "unmerged")
    meta = json.loads((out / "vtc.json").read_text())
    assert meta["lora"] == {
        "llm": {"r": recipe.stages[1].lora.r, "alpha": recipe.stages[1].lora.alpha, "dropout": 0.0}
    }
    # the HF part holds the base weights under their plain names, the adapters are apart
    from safetensors.torch import load_file

    hf_names = set(load_file(str(out / "model.safetensors")))
    assert not any("lora_" in n or "base_layer" in n for n in hf_names)
    loaded = load_pretrained(out)
    assert any("lora_" in n for n, _ in loaded.model.named_parameters())
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=0)


@pytest.mark.slow
def test_vtc_ask_answers_alike_from_the_run_its_export_and_python(lora_run, capsys):
    """A run on a base built from configs (no trained LLaVA to compare against) is asked, with
    its LoRA, as its export is."""
    from train.ask import answers
    from train.cli import main

    tmp, recipe, _ = lora_run
    out = export_run(tmp / "run", tmp / "asked")  # unmerged LoRA: the same weights exactly
    test = split_shards(recipe.data, "test")
    image = tmp / "asked.png"
    image.write_bytes(test.image_bytes(0))
    questions = [
        q
        for q, *_ in [
            (c["value"].replace("<image>", "").strip(),) for c in test.record(0)["conversations"][::2]
        ]
    ]
    replies = {}
    for source in (tmp / "run", out):
        assert main(["ask", str(source), str(image), *questions, "--json"]) == 0
        printed = capsys.readouterr().out.splitlines()  # and DeepSpeed's import-time log line
        replies[source] = [json.loads(line) for line in printed if line.startswith("{")]
    assert replies[tmp / "run"] == replies[out]
    assert [r["visual_tokens"] for r in replies[out]] == [16] * len(questions)  # TokenPacker s=2
    python = answers(load_pretrained(out), image.read_bytes(), questions)
    assert python == replies[out]


def test_load_pretrained_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vtc export$"):
        load_pretrained(tmp_path)
    (tmp_path / "recipe.yaml").write_text("seed: 0\n")  # a training run's folder
    with pytest.raises(FileNotFoundError, match="it is a training run: `vtc export .* OUT` writes one"):
        load_pretrained(tmp_path)
    (tmp_path / "vtc.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="format"):
        load_pretrained(tmp_path)


@pytest.mark.slow
def test_a_run_on_a_base_built_from_configs_is_evaluated_alone(lora_run, tmp_path):
    """With no baseline row and no training-free baselines, nothing needs its (untrained) base:
    `vtc evaluate` scores its model as training's own evaluation did."""
    from train.evaluate import evaluate
    from train.evaluation.measure import Settings

    tmp, recipe, metrics = lora_run
    settings = Settings(limit=recipe.eval.limit, timing=False)
    report = evaluate(str(tmp / "run"), [], out_dir=tmp_path / "report", settings=settings, baseline="none")
    (row,) = report["rows"]
    assert row["method"] == "model" and row["per_family"] == metrics["per_family"]
    assert row["visual_tokens"] == 16  # TokenPacker at scale 2 on the smoke tower's 8 × 8 patches
    with pytest.raises(UserError, match="not a trained LLaVA to compare against"):
        evaluate(
            str(tmp / "run"), ["pooling"], out_dir=tmp_path / "report", settings=settings, baseline="none"
        )


@pytest.mark.slow
def test_a_step_checkpoint_rebuilds_and_exports_the_model_at_that_step(lora_run):
    from safetensors.torch import load_file

    from train.checkpoint import list_checkpoints

    tmp, _, _ = lora_run
    first, last = list_checkpoints(tmp / "run")  # the end of each stage (its 2 stages are short)
    assert (first.stage, last.stage) == ("vision", "instruct")
    after_instruct = rebuild_run(last.path)[0]
    torch.testing.assert_close(logits(after_instruct), logits(rebuild_run(tmp / "run")[0]), rtol=0, atol=0)

    after_vision = rebuild_run(first.path)[0]
    # the stage that injects LoRA into the LLM comes later; the tower has its first stage's weights
    assert not any("lora_" in n for n, _ in after_vision.model.named_parameters())
    saved = load_file(str(first.path / "trainable.safetensors"))
    assert any(k.startswith("region_head.") for k in saved)  # a training-only head, left out
    state = after_vision.model.state_dict()
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(torch.equal(state[k.removeprefix("model.")], saved[k]) for k in model_keys)
    assert not torch.equal(logits(after_vision), logits(after_instruct))

    out = export_run(first.path, tmp / "from-checkpoint")
    torch.testing.assert_close(logits(load_pretrained(out)), logits(after_vision), rtol=0, atol=0)


@pytest.mark.slow
def test_a_checkpoint_without_its_weights_file_is_refused_by_name(lora_run, tmp_path):
    from train.checkpoint import list_checkpoints
    from train.evaluation.sources import resolve_source

    tmp, _, _ = lora_run
    last = list_checkpoints(tmp / "run")[-1]
    # evaluating a checkpoint compares it with its base, which this run builds from configs
    with pytest.raises(UserError, match="not a trained LLaVA to compare against .* --baselines ''"):
        resolve_source(str(last.path))
    # DeepSpeed writes its own sharded layout in place of trainable.safetensors
    sharded = tmp_path / "run" / "ckpt" / last.path.name
    sharded.mkdir(parents=True)
    (sharded / "info.json").write_text((last.path / "info.json").read_text())
    (tmp_path / "run" / "recipe.yaml").write_text((tmp / "run" / "recipe.yaml").read_text())
    with pytest.raises(UserError, match="DeepSpeed's sharded layout"):
        rebuild_run(sharded)


@pytest.mark.slow
def test_evaluating_a_checkpoint_writes_the_report_beside_the_checkpoints(lora_run, tmp_path):
    import shutil

    import yaml

    from models.build import build, save_as_llava_hf
    from models.tiny import TinyConfig
    from train.checkpoint import list_checkpoints
    from train.cli import main

    tmp, _, _ = lora_run
    # the same run on a base that is a llava-hf folder (a trained LLaVA to compare against)
    run = shutil.copytree(tmp / "run", tmp_path / "run")
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    save_as_llava_hf(build("tiny", tiny=TinyConfig(**saved["model"].pop("tiny"))), tmp_path / "base")
    saved["model"]["base"] = str(tmp_path / "base")
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    checkpoint = list_checkpoints(run)[-1].path
    before = sorted(p.name for p in checkpoint.iterdir())
    args = ["evaluate", str(checkpoint), "--limit", "2", "--baselines", "", "--no-timing"]
    assert main(args) == 0
    # checkpoint rotation deletes whole checkpoint folders, so the report must not go in one
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    report = json.loads((run / "eval" / checkpoint.name / "eval.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"baseline", "model"}
    assert report["source"] == f"checkpoint {checkpoint}"


CHAT = (
    "{% for m in messages %}{{ m.role }} : {{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.mark.slow
def test_a_chat_template_run_is_trained_evaluated_and_exported_in_its_template(tmp_path):
    """`template: chat` with a given Jinja and system prompt: the stage's samples are rendered
    with it, the held-out evaluation prompts with it, and the export records it, so reloading
    and evaluating the export prompts the model as it was trained."""
    from data.dataset import ConversationDataset
    from train.evaluation.sources import resolve_source
    from train.recipe import model_template, stage_templates

    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHAT)
    recipe = load_recipe(
        "tiny/smoke",
        [
            f"output={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'data'}",
            "stages.0.steps=1",
            "stages.1.steps=6",
            "stages.1.template=chat",
            f"model.chat_template={jinja}",
            "model.system_prompt=user",
        ],
    )
    (template,) = stage_templates(recipe.stages[1], recipe.model)
    metrics = run_recipe(recipe)
    built, *_ = rebuild_run(tmp_path / "run")
    assert built.template.to_dict() == {"name": "chat", "system": "user", "jinja": CHAT}
    sample = ConversationDataset(
        split_shards(recipe.data, "train"), built.tokenizer, template, 64, 4, 512, 64
    )[0]
    text = built.tokenizer.decode(sample["input_ids"])
    # ("system" is not a word of the tiny vocabulary)
    assert text.startswith("<unk> : user </s> user : <image>") and "</s> assistant :" in text
    test = split_shards(recipe.data, "test")
    again = evaluate_accuracy(
        built.model, built.tokenizer, test, 64, template=model_template(recipe), limit=recipe.eval.limit
    )
    assert again["per_family"] == metrics["per_family"]
    out = export_run(tmp_path / "run", tmp_path / "export")
    assert json.loads((out / "vtc.json").read_text())["template"] == built.template.to_dict()
    loaded = load_pretrained(out)
    assert loaded.template.to_dict() == built.template.to_dict()
    assert resolve_source(str(out)).template.to_dict() == built.template.to_dict()
    assert resolve_source(str(tmp_path / "run")).template.to_dict() == built.template.to_dict()


@pytest.mark.slow
def test_evaluation_builds_a_run_and_its_export_straight_in_half_precision(lora_run):
    """`vtc evaluate --dtype bfloat16` builds each row in bfloat16 (a 7B base is never read into
    memory at its float32 size) and gets the float32 build's weights rounded, bit for bit: the run
    (TokenPacker and LLM LoRA trained), its export and the export's base."""
    from models.build import to_precision
    from train.evaluation.sources import resolve_source

    tmp, *_ = lora_run
    export = resolve_source(str(export_run(tmp / "run", tmp / "export-for-half")), "bfloat16")
    full = resolve_source(export.out_dir)
    pairs = [
        (rebuild_run(tmp / "run", dtype="bfloat16")[0], rebuild_run(tmp / "run")[0]),
        (export.model(), full.model()),
        (export.base(), full.base()),
    ]
    for built, reference in pairs:
        base_weights = {p.dtype for name, p in built.hf.named_parameters() if "lora_" not in name}
        assert base_weights == {torch.bfloat16}
        got = to_precision(built.model, torch.bfloat16).state_dict()
        want = to_precision(reference.model, torch.bfloat16).state_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_an_export_replaces_a_former_one_whole_and_a_crash_keeps_it(lora_run, monkeypatch, capsys):
    tmp, _, _ = lora_run
    out = export_run(tmp / "run", tmp / "again")
    assert (out / "lora.safetensors").is_file()
    (out / "eval.md").write_text("a report on the former export")  # `vtc evaluate EXPORT` writes there
    merged = logits(rebuild_run(tmp / "run")[0])
    capsys.readouterr()
    export_run(tmp / "run", out, merge=True)  # the unmerged export's adapters do not linger
    assert not (out / "lora.safetensors").exists() and not (out / "eval.md").exists()
    assert (
        "holds an earlier export: replacing it whole, with the evaluation report" in capsys.readouterr().out
    )
    torch.testing.assert_close(logits(load_pretrained(out)), merged, rtol=1e-4, atol=1e-5)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr("models.export.save_hf", crash)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_run(tmp / "run", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_refuses_the_run_itself_a_folder_above_it_a_file_and_other_files(tmp_path):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = {
        run: "would replace",
        tmp_path / "runs": "would replace",
        tmp_path / "file": "is a file",
        tmp_path / "other": "holds files other than a vtc export",
    }
    for out, message in cases.items():
        with pytest.raises(UserError, match=message):
            export_run(run, out)  # refused before the run is read: it has no recipe.yaml
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_run_that_has_not_finished_points_to_its_newest_checkpoint(lora_run, tmp_path):
    """`vtc export` / `vtc evaluate` on a run that stopped (or is still training) name its
    newest checkpoint, which they take, and the command that finishes the run; a run with no
    checkpoint yet is told to resume; a shipped base (recipe.yaml, no logs) is no unfinished run."""
    import shutil

    from train.checkpoint import latest_checkpoint
    from train.evaluation.sources import resolve_source

    tmp, _, _ = lora_run
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp / "run", stopped)
    for name in ("trainable.safetensors", "meta.json", "metrics.json"):
        (stopped / name).unlink()
    newest = latest_checkpoint(stopped)
    for call, command in (
        (lambda: export_run(stopped, tmp_path / "out"), "export"),
        (lambda: resolve_source(str(stopped)), "evaluate"),
    ):
        with pytest.raises(UserError) as refused:
            call()
        assert f"{stopped} is a run that has not finished; `vtc {command} {newest.path}" in str(refused.value)
        assert f"(stage 'instruct', step {newest.step}), or `vtc resume {stopped}` finishes it" in str(
            refused.value
        )
    assert not (tmp_path / "out").exists()
    assert (export_run(newest.path, tmp_path / "out") / "vtc.json").is_file()  # what it points to
    shutil.rmtree(tmp_path / "out")

    shutil.rmtree(stopped / "ckpt")
    with pytest.raises(UserError, match="has not finished and has no checkpoint yet; `vtc resume"):
        export_run(stopped, tmp_path / "out")

    from models.pretrained import shipped_path

    with pytest.raises(FileNotFoundError, match="not a finished run"):
        export_run(shipped_path("tiny-llava"), tmp_path / "out")


def test_compressor_only_on_a_tiny_config_run_is_refused_before_the_model_is_rebuilt(tmp_path, monkeypatch):
    """`--compressor-only` needs a base on disk; a run on the tiny configs is refused from its
    recipe alone, before any weights are read (here there are none to read)."""
    import train.export
    from train.recipe import recipe_to_yaml

    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe("tiny/smoke", [f"output={run}", f"data.cache_dir={tmp_path / 'data'}"])
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    monkeypatch.setattr(train.export, "rebuild_run", lambda *a, **k: pytest.fail("rebuilt the model"))
    with pytest.raises(UserError, match="--compressor-only needs a base on disk"):
        export_run(run, tmp_path / "out", compressor_only=True)
    assert not (tmp_path / "out").exists()


def test_compressor_only_refuses_to_leave_out_what_the_run_trained(tmp_path):
    """`--compressor-only` writes the components and LoRA adapters, and names the base for the
    rest: a run that trained its LLM in full is refused (its export would be another model),
    and so are LoRA adapters it would be asked to merge into weights it does not write; nothing
    is written.
    Adapters kept unmerged go with it and load back."""
    common = [f"data.cache_dir={tmp_path / 'data'}", "data.synthetic.train=64", "data.synthetic.test=4"]
    common += ["eval.limit=2", "eval.baselines=[]", "stages.0.steps=2", "stages.0.batch_size=4"]
    run_recipe(load_recipe("tiny/mlp", [f"output={tmp_path / 'full'}", *common]))
    with pytest.raises(
        UserError, match=r"trained weights outside its projector and compressors \(in its llm, e\.g\."
    ):
        export_run(tmp_path / "full", tmp_path / "out", compressor_only=True)
    run_recipe(load_recipe("tiny/mlp", [f"output={tmp_path / 'lora'}", "stages.0.train.llm=lora", *common]))
    with pytest.raises(UserError, match="--merge-lora folds the run's LoRA adapters"):
        export_run(tmp_path / "lora", tmp_path / "out", merge=True, compressor_only=True)
    assert not (tmp_path / "out").exists()
    whole = load_pretrained(export_run(tmp_path / "lora", tmp_path / "whole"))
    alone = load_pretrained(export_run(tmp_path / "lora", tmp_path / "out", compressor_only=True))
    assert (
        not (tmp_path / "out" / "model.safetensors").exists()
        and (tmp_path / "out" / "lora.safetensors").exists()
    )
    assert torch.equal(logits(alone), logits(whole))


def test_an_export_is_evaluated_as_its_run_is(tmp_path, capsys, monkeypatch):
    """`vtc evaluate EXPORT` measures what `vtc evaluate RUN` does: against the LLaVA the run was
    attached to (not the export's own LLM, trained, without its compressors), on the run's test
    data, with the model at each budget its compressors can keep, and with them left out."""
    from models.pretrained import shipped_path
    from train.evaluate import Settings, evaluate
    from train.evaluation.sources import resolve_source

    monkeypatch.chdir(tmp_path)  # where the export's evaluation writes the synthetic test split
    overrides = [f"output={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}", "eval.limit=2"]
    overrides += ["data.synthetic.train=64", "data.synthetic.test=4", "data.synthetic.seed=7"]
    overrides += ["eval.baselines=[]", "stages.0.steps=2", "stages.0.batch_size=4", "stages.0.optim.lr=0.05"]
    recipe = load_recipe("tiny/avgpool", overrides)
    run_recipe(recipe)
    out = export_run(tmp_path / "run", tmp_path / "export")
    source = resolve_source(str(out))
    assert source.base_dir == str(shipped_path("tiny-llava"))
    assert source.data.synthetic == recipe.data.synthetic  # seed 7, not the default
    report = {}
    for name, target in (("run", tmp_path / "run"), ("export", out)):
        settings = Settings(limit=2, timing=False)
        report[name] = evaluate(
            str(target), [], out_dir=tmp_path / f"ev-{name}", settings=settings, uncompressed=True
        )
    rows = {
        name: [
            (r["method"], r["budget"], r["accuracy"], r["accuracy_kept"], r["agreement"], r["flops"])
            for r in report[name]["rows"]
        ]
        for name in report
    }
    assert [m for m, *_ in rows["run"]] == [
        "baseline",
        "model",
        "model",
        "model-uncompressed",
    ]
    assert rows["export"] == rows["run"]

    meta = json.loads((out / "vtc.json").read_text())  # the base it was trained on is gone
    (out / "vtc.json").write_text(
        json.dumps({**meta, "run": {**meta["run"], "base": str(tmp_path / "gone")}})
    )
    assert resolve_source(str(out)).base_dir == str(out)
    assert "the base its run was trained on" in capsys.readouterr().out
    gone = {**meta["run"]["data"], "test_shards": str(tmp_path / "shards")}  # a run on shards, moved
    (out / "vtc.json").write_text(json.dumps({**meta, "run": {**meta["run"], "data": gone}}))
    with pytest.raises(UserError, match="its run's test shards, .*shards, which are not there.*--questions"):
        evaluate(str(out), [], out_dir=tmp_path / "ev-gone", settings=Settings(limit=2, timing=False))


def test_a_compressor_only_export_whose_base_moved_says_how_to_point_it_there(tmp_path):
    """A `--compressor-only` export names its base's folder in vtc.json: moved, loading and
    evaluating say so in one line, and setting "base" to the new place loads it."""
    import shutil

    from models.export import export
    from models.pretrained import shipped_path
    from train.cli import main

    base = tmp_path / "base"
    shutil.copytree(shipped_path("tiny-llava"), base)
    (base / "provenance.json").unlink()  # a base of the user's own
    spec = ComponentSpec("avgpool2d", {"stride": 2})
    out = export(
        build(str(base), compressors=[spec]),
        tmp_path / "exp",
        ComponentSpec("mlp2x_gelu"),
        [spec],
        str(base),
        compressor_only=True,
    )
    base.rename(tmp_path / "moved")
    with pytest.raises(UserError, match=f"the base it goes on, {base}, is not there any more"):
        load_pretrained(out)
    assert main(["evaluate", str(out), "--limit", "1", "--out", str(tmp_path / "report")]) == 2
    meta = json.loads((out / "vtc.json").read_text())
    (out / "vtc.json").write_text(json.dumps({**meta, "base": str(tmp_path / "moved")}))
    assert load_pretrained(out).model.visual_tokens() == 16


@pytest.mark.parametrize("views", [None, ((1, 1), (2, 2))], ids=["one-view", "views"])
@pytest.mark.parametrize("compressor_only", [False, True], ids=["whole", "compressor-only"])
def test_an_export_of_a_trained_mlp_is_evaluated_and_asked_as_trained(tmp_path, views, compressor_only):
    """An MLP-only export is its trained projector, whether its llava-hf part holds it (a whole
    export of one view: evaluated as a base) or it goes on the base it names (`--compressor-only`,
    which `vtc evaluate` and `vtc ask` took for that base before) or on views."""
    from models.export import export
    from models.pretrained import shipped_path
    from models.views import MultiViewConfig
    from train.evaluation.sources import model_for, resolve_source

    base = str(shipped_path("tiny-llava"))
    config = None if views is None else MultiViewConfig(views, newline=False)
    built = build(base, views=config)
    with torch.no_grad():  # as after training: not the base's projector any more
        for p in built.model.projector.parameters():
            p.add_(torch.randn_like(p))
    out = export(built, tmp_path / "export", ComponentSpec("mlp2x_gelu"), [], base, compressor_only)
    source = resolve_source(str(out))
    assert (source.model is None) == (views is None and not compressor_only)  # only then a base
    trained = built.model.projector.state_dict()
    for got in (model_for(str(out)), load_pretrained(out)):
        assert all(torch.equal(v, trained[k]) for k, v in got.model.projector.state_dict().items())
        assert (got.model.views is None) == (views is None)
    if compressor_only:  # its baseline is the base it went on, untrained
        baseline = source.base().model.projector.state_dict()
        assert not all(torch.equal(v, trained[k]) for k, v in baseline.items())


@pytest.mark.slow
def test_weights_model_init_gave_a_run_are_its_own_in_its_export(tmp_path):
    """Routers trained on an initialised model (`tiny/tokenpacker-dyvte`'s shape; here run A
    trains the MLP and the LLM, then run B the LLM through LoRA alone): B's trainable.safetensors
    holds what A gave it (the LLM's under LoRA's `base_layer` names), so B's export has it even
    once A is gone; a run saved before that (only what its stages trained) gets it from A, where
    A still is."""
    import shutil

    from safetensors.torch import load_file, save_file

    common = [f"data.cache_dir={tmp_path / 'data'}", "data.synthetic.train=64", "data.synthetic.test=4"]
    common += ["eval.limit=2", "eval.baselines=[]", "stages.0.steps=2", "stages.0.batch_size=4"]
    run_recipe(load_recipe("tiny/mlp", [f"output={tmp_path / 'a'}", *common]))
    second = [f"output={tmp_path / 'b'}", f"model.init={tmp_path / 'a'}", *common]
    run_recipe(
        load_recipe("tiny/mlp", [*second, "stages.0.train.projector=frozen", "stages.0.train.llm=lora"])
    )
    given = load_file(str(tmp_path / "a" / "trainable.safetensors"))
    assert any(k.startswith("projector.") for k in given) and any(k.startswith("llm.") for k in given)

    def named_in(state: dict, name: str) -> torch.Tensor:  # under LoRA, a Linear's weight moved
        parent, _, leaf = name.rpartition(".")
        return state[name] if name in state else state[f"{parent}.base_layer.{leaf}"]

    def has_what_a_gave(export_name: str) -> bool:
        state = load_pretrained(export_run(tmp_path / "b", tmp_path / export_name)).model.state_dict()
        return all(torch.equal(named_in(state, k), v) for k, v in given.items())

    held = load_file(str(tmp_path / "b" / "trainable.safetensors"))
    assert all(torch.equal(named_in(held, k), v) for k, v in given.items())  # B's own now
    shutil.move(tmp_path / "a", tmp_path / "a-moved")  # A gone: B's file is enough
    assert has_what_a_gave("x1")
    # as a run trained before 2026-12-07 saved it: its LoRA adapters alone, A's weights in A
    adapters = {k: v for k, v in held.items() if "lora_" in k}
    save_file(adapters, str(tmp_path / "b" / "trainable.safetensors"))
    shutil.move(tmp_path / "a-moved", tmp_path / "a")
    assert has_what_a_gave("x2")
