"""`vtc import`: tiny checkpoints written in the original LLaVA layout (key names as in
haotian-liu/LLaVA, CircleRadon/TokenPacker and DoubtedSteam/DyVTE) come back as vtc exports
that answer exactly as the models they were written from."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from data.errors import UserError
from models.build import ComponentSpec, build
from models.export import load_pretrained
from models.importer import TOKENPACKER_NAMES, import_llava
from models.views import CropIndicators, MultiViewConfig
from tests.conftest import TEST_TINY
from train.recipe import REPO_ROOT

README = REPO_ROOT / "README.md"


def original_layout(built, out: Path, projector: dict, extra: dict | None = None, bin_file=False, **config):
    """Write `built`'s weights as the original LLaVA code saves them."""
    out.mkdir(parents=True)
    tensors = {}
    for key, value in built.hf.state_dict().items():
        if key.startswith("model.language_model."):
            tensors["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.vision_tower."):
            tensors["model.vision_tower.vision_tower." + key[len("model.vision_tower.") :]] = value
        elif key.startswith("lm_head."):
            tensors[key] = value
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
    tensors.update(extra or {})
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}
    if bin_file:
        torch.save(tensors, out / "pytorch_model.bin")
    else:
        save_file(tensors, str(out / "model.safetensors"))
    text = built.hf.config.text_config.to_dict()
    original = {k: v for k, v in text.items() if not isinstance(v, dict)}
    original |= {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": "tiny-clip",
        "mm_hidden_size": built.hf.config.vision_config.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        **config,
    }
    (out / "config.json").write_text(json.dumps(original))
    built.tokenizer.save_pretrained(out)
    tower = out.parent / "tower"
    built.hf.config.vision_config.save_pretrained(tower)
    return tower


def original_mlp(built) -> dict:
    """The llava-hf MLP projector under LLaVA's own names (`0.` and `2.` of an nn.Sequential)."""
    return {
        k.replace("linear_1.", "0.").replace("linear_2.", "2."): v
        for k, v in built.hf.model.multi_modal_projector.state_dict().items()
    }


def same_logits(reference, imported, tokenizer):
    model = reference.model.eval()
    ids = torch.tensor([[tokenizer.bos_token_id, model.image_token_id, 10, 11, 12]])
    mask, pixels = (
        torch.ones_like(ids, dtype=torch.bool),
        torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
    )
    with torch.no_grad():
        expected = model(ids, mask, pixels, return_logits=True).logits
        got = imported.model.eval()(ids, mask, pixels, return_logits=True).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected)


@pytest.mark.parametrize("bin_file", [False, True])
def test_llava_mlp_checkpoint(tmp_path, bin_file):
    built = build("tiny", tiny=TEST_TINY, seed=0)
    projector = original_mlp(built)
    tower = original_layout(built, tmp_path / "llava", projector, bin_file=bin_file)
    out, notes = import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower)
    imported = load_pretrained(out)
    assert imported.model.projector.registry_name == "mlp2x_gelu" and notes == []
    same_logits(built, imported, built.tokenizer)


def test_tokenpacker_and_dyvte_checkpoint(tmp_path):
    built = build(
        "tiny",
        projector=ComponentSpec("tokenpacker", {"scale": 2}),
        compressors=[ComponentSpec("dyvte", {"hidden": 16})],
        tiny=TEST_TINY,
        seed=1,
    )
    to_authors = {v: k for k, v in TOKENPACKER_NAMES.items()}
    projector = {}
    for key, value in built.model.projector.state_dict().items():
        prefix = next(p for p in to_authors if key.startswith(p))
        projector[to_authors[prefix] + key[len(prefix) :]] = value
    routers = {}
    layers = built.hf.config.text_config.num_hidden_layers
    for index in range(layers):  # the authors have one router per layer, the last one too
        if index < layers - 1:
            router = built.model.compressors[0].routers[index]
            w1, w2 = router[0].weight, router[2].weight
        else:
            w1, w2 = torch.randn(16, 2 * 64), torch.randn(2, 16)
        routers[f"model.visual_gates_router.{index}.w1.weight"] = w1
        routers[f"model.visual_gates_router.{index}.w2.weight"] = w2
    tower = original_layout(
        built, tmp_path / "tp", projector, routers, mm_projector_type="tokenpacker", scale_factor=2
    )
    out, notes = import_llava(tmp_path / "tp", tmp_path / "export", vision_tower=tower)
    imported = load_pretrained(out)
    assert imported.model.projector.registry_name == "tokenpacker"
    assert [c.registry_name for c in imported.model.compressors] == ["dyvte"]
    assert any("last layer's router" in n for n in notes)
    for mine, theirs in zip(
        built.model.compressors[0].routers, imported.model.compressors[0].routers, strict=True
    ):
        torch.testing.assert_close(theirs[0].weight, mine[0].weight)
    same_logits(built, imported, built.tokenizer)
    # the llava-hf part's own projector, which the checkpoint has no weights for, starts as
    # transformers draws it (the rest is loaded without drawing random weights first)
    fresh = imported.hf.model.multi_modal_projector.linear_1
    assert 0.015 < fresh.weight.std().item() < 0.025 and not fresh.bias.any()


def test_llavolta_setting_is_given_on_the_command_line(tmp_path):
    built = build("tiny", tiny=TEST_TINY, seed=0)
    projector = original_mlp(built)
    tower = original_layout(built, tmp_path / "llava", projector)
    out, _ = import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower, llavolta=(1, 4))
    imported = load_pretrained(out)
    llavolta = imported.model.compressors[0]
    assert llavolta.registry_name == "llavolta" and llavolta.config.inference.stride == 4


def test_the_prompt_template_is_given_on_the_command_line(tmp_path):
    """A checkpoint tuned with its tokenizer's chat template is imported as such (the export
    records it, so its evaluation prompts through it); a tokenizer without one is refused, unless
    a template is given."""
    from data.templates import get_template
    from tests.test_templates import LLAMA3_LIKE

    built = build("tiny", tiny=TEST_TINY, seed=0)
    tower = original_layout(built, tmp_path / "llava", original_mlp(built))
    with pytest.raises(UserError, match="no chat template"):
        import_llava(
            tmp_path / "llava", tmp_path / "refused", vision_tower=tower, template=get_template("chat")
        )
    given = get_template("chat", jinja=LLAMA3_LIKE)  # `--chat-template FILE` serves such a tokenizer
    out, _ = import_llava(tmp_path / "llava", tmp_path / "given", vision_tower=tower, template=given)
    assert load_pretrained(out).template.to_dict() == given.to_dict()
    built.tokenizer.chat_template = LLAMA3_LIKE
    built.tokenizer.save_pretrained(tmp_path / "llava")
    chat = get_template("chat", "Be brief.")
    out, _ = import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower, template=chat)
    assert load_pretrained(out).template.to_dict() == chat.to_dict()
    plain, _ = import_llava(tmp_path / "llava", tmp_path / "default", vision_tower=tower)
    assert load_pretrained(plain).template.name == "vicuna_v1"
    from train.cli import main

    lone = ["import", str(tmp_path / "llava"), str(tmp_path / "x"), "--system-prompt", "Be brief."]
    assert main(lone) == 2 and not (tmp_path / "x").exists()  # a system prompt needs --template chat


def test_refuses_what_it_cannot_read_safely(tmp_path):
    built = build("tiny", tiny=TEST_TINY, seed=0)
    projector = original_mlp(built)
    tower = original_layout(built, tmp_path / "llava", projector, bin_file=True)
    torch.save(
        {"weights": Path("not a tensor")}, tmp_path / "llava" / "pytorch_model.bin"
    )  # a pickled object
    with pytest.raises(UserError, match="not a plain tensor checkpoint"):
        import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower)
    (tmp_path / "llava" / "pytorch_model.bin").rename(tmp_path / "llava" / "model.pt")
    with pytest.raises(UserError, match="model.pt: not read"):
        import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower)
    (tmp_path / "llava" / "model.safetensors").write_bytes(b"\x10\x00")  # a download cut short
    with pytest.raises(UserError, match=r"model.safetensors: cannot be read \(SafetensorError"):
        import_llava(tmp_path / "llava", tmp_path / "export", vision_tower=tower)
    hf_dir = tmp_path / "hf"
    built.hf.save_pretrained(hf_dir)
    with pytest.raises(UserError, match="already llava-hf"):
        import_llava(hf_dir, tmp_path / "export")


def test_vtc_import_refuses_to_write_over_its_source_or_other_files(tmp_path, capsys):
    from train.cli import main

    built = build("tiny", tiny=TEST_TINY, seed=0)
    tower = original_layout(built, tmp_path / "llava", original_mlp(built), bin_file=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "llava").iterdir())
    for out, message in [
        ("llava", "would replace"),
        (".", "would replace"),
        ("mine", "other than a vtc export"),
    ]:
        assert (
            main(["import", str(tmp_path / "llava"), str(tmp_path / out), "--vision-tower", str(tower)]) == 2
        )
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "llava").iterdir()) == before
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    # into a former export: replaced whole, the same way `vtc export` does
    command = ["import", str(tmp_path / "llava"), str(tmp_path / "export"), "--vision-tower", str(tower)]
    assert main(command) == 0 and main([*command, "--llavolta", "1,4"]) == 0
    assert json.loads((tmp_path / "export" / "vtc.json").read_text())["compressors"][0]["name"] == "llavolta"


def falcon_layout(built, out: Path, anchors: int, indicators: bool) -> Path:
    """Write a vtc FALCON model as FALCON's released code (JiuTian-VL/FALCON, model_type
    `jiutian`) saves one: a Llama config with `visual_config`, `projector_config` and
    `processor_config`; the tower as transformers 4's SigLIP names it, ReAtten as each layer's
    `interact_attn`, the registers and crop embeddings under `model.vision_model.`, the
    projector as `model.vision2text.{0,2}`. Returns the tower's config folder."""
    out.mkdir(parents=True)
    model, falcon = built.model, built.model.compressors[0]
    tower_root = "model.vision_model.vision_tower.vision_model."
    tensors = {}
    for key, value in built.hf.state_dict().items():
        if key.startswith("model.language_model."):
            tensors["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.vision_tower."):
            tensors[tower_root + key[len("model.vision_tower.") :]] = value
        elif key.startswith("lm_head."):
            tensors[key] = value
    for key, value in falcon.reatten.state_dict().items():
        layer, name = key.split(".", 1)
        tensors[f"{tower_root}encoder.layers.{layer}.interact_attn.{name}"] = value
    tensors["model.vision_model.vision_queries"] = falcon.registers.data
    tensors["model.vision_model.crop_embedding_h.weight"] = falcon.crop_row.weight.data
    tensors["model.vision_model.crop_embedding_w.weight"] = falcon.crop_col.weight.data
    for key, value in model.projector.state_dict().items():
        tensors["model.vision2text." + key.replace("linear_1.", "0.").replace("linear_2.", "2.")] = value
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    text = built.hf.config.text_config.to_dict()
    config = {k: v for k, v in text.items() if not isinstance(v, dict)} | {
        "architectures": ["JiutianLlamaForCausalLM"],
        "model_type": "jiutian",
        "mm_load": True,
        "visual_config": {
            "model_name_or_path": "tiny-siglip",
            "feature_type": "query",
            "num_vision_queries": falcon.config.registers,
            "anchor_max": anchors,
            "enable_interactive_attn": True,
        },
        "projector_config": {"projector_type": "mlp2x_gelu"},
        "processor_config": {
            "image_size": 64,
            "anchors": f"grid_{anchors}",
            "add_global_img": True,
            "add_textual_crop_indicator": indicators,
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    built.tokenizer.save_pretrained(out)
    tower = out.parent / "tower"
    built.hf.config.vision_config.save_pretrained(tower)
    return tower


def falcon_grids(most: int) -> tuple:
    """FALCON's `grid_N` candidates in their order: n = 1..N, each (rows, n / rows)."""
    return tuple((r, n // r) for n in range(1, most + 1) for r in range(1, n + 1) if n % r == 0)


def tiny_falcon(**spec):
    import dataclasses

    return build(
        "tiny",
        compressors=[ComponentSpec("falcon", {"registers": 4, "anchor_max": 4, **spec})],
        tiny=dataclasses.replace(TEST_TINY, vision_type="siglip"),
        seed=0,
        views=MultiViewConfig(falcon_grids(4), newline=False, fit="shape_match"),
    )


def test_falcon_checkpoint_in_its_released_layout(tmp_path):
    """A FALCON checkpoint as the authors' code saves it comes back as vtc's `falcon` with the
    same registers, crop embeddings and ReAtten, their grids (grid_N, shape match), and the
    same logits on a multi-view image; its crop indicators are recorded when it writes them."""
    built = tiny_falcon(init_std=1.0)
    with torch.no_grad():  # as training leaves ReAtten: not the copy a fresh attach makes
        for p in built.model.compressors[0].reatten.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tower = falcon_layout(built, tmp_path / "falcon", anchors=4, indicators=False)
    out, _ = import_llava(tmp_path / "falcon", tmp_path / "export", vision_tower=tower)
    meta = json.loads((out / "vtc.json").read_text())
    falcon = {"registers": 4, "anchor_max": 4, "reatten": True}
    assert meta["compressors"] == [{"name": "falcon", "params": falcon}]
    grids = [list(g) for g in falcon_grids(4)]
    assert meta["views"] == {"grids": grids, "newline": False, "fit": "shape_match"}
    assert len(grids) == 8 and [1, 4] in grids and [4, 1] in grids
    model, original = load_pretrained(out).model.eval(), built.model.eval()
    mine, theirs = model.compressors[0].state_dict(), original.compressors[0].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    tok = built.tokenizer
    ids = torch.tensor([[tok.bos_token_id, model.image_token_id, 10, 11, 12]])
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # thumbnail + 2×2
    args = (ids, torch.ones_like(ids, dtype=torch.bool), pixels)
    with torch.no_grad():
        expected = original(*args, return_logits=True, image_grids=torch.tensor([[2, 2]])).logits
        got = model(*args, return_logits=True, image_grids=torch.tensor([[2, 2]])).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected)

    # with FALCON's text crop indicators (the tokenizer knows their pieces, as Llama-3.1's does)
    indicated = tmp_path / "indicated"
    falcon_layout(built, indicated, anchors=4, indicators=True)
    tok.add_tokens(
        [CropIndicators().text(r, c) for r in range(-1, 4) for c in range(-1, 4) if (r < 0) == (c < 0)]
    )
    tok.save_pretrained(indicated)
    out, _ = import_llava(indicated, tmp_path / "export-indicated", vision_tower=tower)
    recorded = json.loads((out / "vtc.json").read_text())["views"]["indicators"]
    assert recorded == {"whole": "<global_img>", "crop": "<crop_img_row{row}_col{col}>"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"visual_config": {"feature_type": "patch"}}, "feature_type 'patch'"),
        ({"processor_config": {"add_global_img": False}}, "add_global_img"),
        ({"visual_config": {"anchor_max": 9}}, "anchor_max 9 is not the largest side"),
        ({"processor_config": {"anchors": "docowl"}}, "grid_N anchors"),
        ({"projector_config": {"projector_type": "linear"}}, "'linear'"),
        ({"processor_config": {"image_size": 384}}, "image_size 384, but the tower takes 64"),
    ],
)
def test_falcon_checkpoints_vtc_cannot_read_are_refused_by_key(tmp_path, change, message):
    tower = falcon_layout(tiny_falcon(), tmp_path / "falcon", anchors=4, indicators=False)
    config = json.loads((tmp_path / "falcon" / "config.json").read_text())
    for key, value in change.items():
        config[key] = config[key] | value
    (tmp_path / "falcon" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        import_llava(tmp_path / "falcon", tmp_path / "export", vision_tower=tower)


def test_llama3_rope_settings_reach_the_imported_config():
    """A Llama-3.1 config's rope_theta and rope_scaling (which transformers 5 keeps as
    rope_parameters) are not lost on the way to llava-hf's text config."""
    from transformers import SiglipVisionConfig

    from models.importer import llava_config

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    original = {"hidden_size": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0}
    original["rope_scaling"] = scaling | {"original_max_position_embeddings": 8192}
    config = llava_config(original, SiglipVisionConfig(), image_token=5, vocab=128)
    rope = config.text_config.rope_parameters
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_the_readme_commands_for_falcon_8b_run_end_to_end(tmp_path):
    """The README's two commands for FALCON-8B, on a tiny checkpoint in its layout whose
    tokenizer has a Llama-3-shaped chat template: `vtc import --template chat --system-prompt`,
    then `vtc evaluate` on a question file (images of other shapes than square) with no
    baseline row and ReAtten switched off at test as a second row, compared with the model
    question by question."""
    import io

    from PIL import Image

    from models.tiny import tiny_chat_tokenizer
    from train.cli import main

    built = tiny_falcon(init_std=1.0)
    tower = falcon_layout(built, tmp_path / "falcon", anchors=4, indicators=False)
    tokenizer = tiny_chat_tokenizer(built.tokenizer)
    tokenizer.save_pretrained(tmp_path / "falcon")
    export = tmp_path / "falcon-export"
    command = ["import", str(tmp_path / "falcon"), str(export), "--vision-tower", str(tower)]
    assert main([*command, "--template", "chat", "--system-prompt", "Be brief ."]) == 0
    assert json.loads((export / "vtc.json").read_text())["template"]["system"] == "Be brief ."
    (tmp_path / "images").mkdir()
    lines = []
    for index, (width, height) in enumerate([(200, 64), (64, 150), (130, 120)]):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (40 * index, 200, 90)).save(buffer, "PNG")
        (tmp_path / "images" / f"{index}.png").write_bytes(buffer.getvalue())
        lines.append(
            {"question_id": index, "image": f"{index}.png", "text": "What colour ?", "answer": "green"}
        )
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report_dir = tmp_path / "report"
    # the README's command as written, on these files
    (line,) = [t for t in README.read_text().splitlines() if t.strip().startswith("vtc evaluate falcon-8b ")]
    given = {"falcon-8b": str(export), "Q.jsonl": str(tmp_path / "q.jsonl"), "DIR": str(tmp_path / "images")}
    command = [given.get(word, word) for word in shlex.split(line)[1:]]
    assert main([*command, "--out", str(report_dir)]) == 0
    rows = {r["method"]: r for r in json.loads((report_dir / "eval.json").read_text())["rows"]}
    assert list(rows) == ["model", "model[falcon.reatten=false]"]
    assert rows["model[falcon.reatten=false]"]["vs_model"]["questions"] == 3 == rows["model"]["count"]
    assert (report_dir / "answers-model[falcon.reatten=false].jsonl").is_file()
    assert json.loads((report_dir / "eval.json").read_text())["settings"]["dtype"] == "float16"

    # the README's way to prompt as their evaluation does: one more BOS before the template
    from transformers import AutoTokenizer

    from models.export import load_pretrained

    own = AutoTokenizer.from_pretrained(tmp_path / "falcon").chat_template
    (tmp_path / "twice.jinja").write_text("{{ bos_token }}" + own)
    twice = tmp_path / "falcon-twice"
    given = [
        "--template",
        "chat",
        "--system-prompt",
        "Be brief .",
        "--chat-template",
        str(tmp_path / "twice.jinja"),
    ]
    assert main(["import", str(tmp_path / "falcon"), str(twice), "--vision-tower", str(tower), *given]) == 0
    prompts = []
    for out in (export, twice):
        loaded = load_pretrained(out)
        prompts.append(
            loaded.template.prompt("<image>\nWhat colour ?", loaded.tokenizer, loaded.model.image_token_id)
        )
    bos = tokenizer.bos_token_id
    assert prompts[0][0] == bos and prompts[1] == [bos] + prompts[0]
