"""FALCON (models/compressors/falcon.py): registers inside the vision tower and register
attention across the views of one image, on CLIP and SigLIP towers."""

import dataclasses
import json

import pytest
import torch

from models.build import ComponentSpec, build
from models.views import CropIndicators, MultiViewConfig
from tests.conftest import TEST_TINY

M = 4
GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2))
TOWERS = ("clip", "siglip")


def falcon_model(vision_type="clip", reatten=True, seed=0, newline=True, **options):
    tiny = dataclasses.replace(TEST_TINY, vision_type=vision_type)
    return build(
        "tiny",
        compressors=[ComponentSpec("falcon", {"registers": M, "reatten": reatten, **options})],
        tiny=tiny,
        seed=seed,
        views=MultiViewConfig(GRIDS, newline),
    )


def two_images():
    """Views of a 2×2 image (thumbnail + 4 crops) and a 1×2 one (thumbnail + 2 crops)."""
    return torch.randn(5 + 3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor(
        [[2, 2], [1, 2]]
    )


@pytest.mark.parametrize("kind", TOWERS)
def test_registers_enter_without_position_embedding_and_only_they_leave(kind):
    model = falcon_model(kind).model.eval()
    falcon = model.compressors[0]
    pixels, grids = two_images()
    seen = {}
    first_layer = model.vision.layers()[0]

    def record(_module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = first_layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        visual = model.encode_images(pixels, grids)
    hook.remove()
    from models.views import ViewLayout

    layout = ViewLayout.from_grids(grids)
    expected = falcon.registers + falcon.crop_embedding(layout)[:, None]  # no position embedding
    tower = getattr(model.vision.model, "vision_model", model.vision.model)
    if kind == "clip":  # CLIP normalises every input token before its first layer
        expected = tower.pre_layrnorm(expected)
    torch.testing.assert_close(seen["x"][:, -M:], expected)
    assert seen["x"].shape[1] == model.dims.prefix_tokens + 64 + M
    # what leaves: M tokens per view, the last layer's register outputs through the projector
    with torch.no_grad():
        features = model.vision(pixels, encoder=falcon, in_layers=[falcon], views=layout)
        last = features.hidden_states[-1][:, -M:]
        if kind == "siglip":
            last = tower.post_layernorm(last)
    torch.testing.assert_close(features.selected, last)
    assert features.selected.shape == (8, M, model.dims.vision_width)
    assert [v.shape[0] for v in visual] == [model.visual_tokens((2, 2)), model.visual_tokens((1, 2))]
    assert model.visual_tokens() == M


@pytest.mark.parametrize("kind", TOWERS)
def test_the_last_layer_computes_only_the_registers_and_they_equal_the_full_layers(kind, monkeypatch):
    """Only the registers leave the tower, so its last layer runs their rows only (each against
    every key): the same outputs and gradients as the whole layer of HF's own forward, in
    training (ReAtten on, a ragged batch of views), and the last MLP sees V × M rows."""
    from models.compressors.falcon import Falcon
    from models.views import ViewLayout

    pixels, grids = two_images()
    layout = ViewLayout.from_grids(grids)

    def run(rows_only: bool):
        if not rows_only:
            monkeypatch.setattr(Falcon, "last_layer_rows", lambda self: None)
        model = falcon_model(kind, seed=2).model.train()
        falcon = model.compressors[0]
        shapes = []
        hook = model.vision.layers()[-1].mlp.register_forward_pre_hook(
            lambda _m, a: shapes.append(a[0].shape)
        )
        features = model.vision(pixels, encoder=falcon, in_layers=[falcon], views=layout)
        hook.remove()
        features.selected.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        monkeypatch.undo()
        return features, shapes, grads

    (fast, fast_shapes, fast_grads), (full, full_shapes, full_grads) = run(True), run(False)
    torch.testing.assert_close(fast.selected, full.selected, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast.hidden_states[:-1], full.hidden_states[:-1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the layers before run as HF runs them
    assert fast.hidden_states[-1].shape == (8, M, full.hidden_states[-1].shape[-1])
    assert fast_shapes == [(8, M, fast.hidden_states[-1].shape[-1])] and full_shapes[0][1] > M
    assert "compressors.0.reatten.1.q_proj.weight" in fast_grads and fast_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", TOWERS)
def test_the_flops_vtc_evaluate_counts_include_registers_reatten_and_the_last_layers_saving(kind):
    """The tower as it runs: per view the plain tower with M more tokens in every layer and a
    last layer of M rows; with ReAtten, in every layer its projections and attention over the
    registers of the image's V views (V·M rows), 2 FLOPs per multiply-add."""
    from models.flops import module_flops, vision_flops

    pixels, grids = torch.randn(5, 3, 64, 64), torch.tensor([[2, 2]])
    counted = {}
    for reatten in (False, True):
        built = falcon_model(kind, reatten=reatten)
        counted[reatten] = module_flops(built.model.eval().vision_features, pixels, grids)
    config = built.hf.config.vision_config
    assert counted[False] == 5 * vision_flops(config, extra_tokens=M, last_layer_rows=M)
    rows, d = 5 * M, config.hidden_size
    per_layer = 2 * (4 * rows * d * d + 2 * rows * rows * d)  # Q, K, V, O; QKᵀ and AV
    assert counted[True] - counted[False] == config.num_hidden_layers * per_layer


def test_reatten_starts_as_a_copy_of_each_layers_attention():
    model = falcon_model().model
    for reatten, layer in zip(model.compressors[0].reatten, model.vision.layers(), strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            source = getattr(layer.self_attn, name)
            assert torch.equal(getattr(reatten, name).weight, source.weight)
            assert torch.equal(getattr(reatten, name).bias, source.bias)


@pytest.mark.parametrize("kind", TOWERS)
def test_reatten_with_a_zeroed_output_starts_as_no_reatten_and_learns(kind):
    """`reatten_init: copy-zero-out`: switching ReAtten on changes no output until its output
    projection has learned, and that projection gets a gradient from the first step."""
    model = falcon_model(kind, reatten_init="copy-zero-out").model
    falcon = model.compressors[0]
    for reatten, layer in zip(falcon.reatten, model.vision.layers(), strict=True):
        assert torch.equal(reatten.q_proj.weight, layer.self_attn.q_proj.weight)
        assert not reatten.out_proj.weight.any() and not reatten.out_proj.bias.any()
    pixels, grids = two_images()
    with torch.no_grad():
        on = model.eval().encode_images(pixels, grids)
    plain = falcon_model(kind, reatten=False).model.eval()  # same seed: same registers and tower
    with torch.no_grad():
        off = plain.encode_images(pixels, grids)
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.cat(model.train().encode_images(pixels, grids)).square().mean().backward()
    assert all(r.out_proj.weight.grad.abs().sum() > 0 for r in falcon.reatten)


def test_an_unknown_reatten_init_names_the_file_and_key_only():
    """The bad value is the one problem: the component stays in the model (with its default), so
    the stage that sets its `reatten` is not reported as naming a missing component."""
    from train.recipe import RecipeError, load_recipe

    with pytest.raises(
        RecipeError, match=r"falcon\.yaml(.|\n)*compressors\[0\]\.reatten_init: must be one of"
    ) as err:
        load_recipe("tiny/falcon", ["model.compressors.0.reatten_init=zeros"])
    assert [p.key for p in err.value.problems] == ["model.compressors[0].reatten_init"]


@pytest.mark.parametrize("kind", TOWERS)
def test_reatten_carries_information_between_the_views_of_one_image_only(kind):
    model = falcon_model(kind).model.eval()
    pixels, grids = two_images()
    changed = pixels.clone()
    changed[3] += 1.0  # crop (1, 0) of image 0
    with torch.no_grad():
        before, after = model.encode_images(pixels, grids), model.encode_images(changed, grids)
    assert not torch.allclose(before[0][:M], after[0][:M])  # image 0's thumbnail registers moved
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)  # image 1 untouched
    # without ReAtten a crop cannot reach the thumbnail's registers
    plain = falcon_model(kind, reatten=False).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain.encode_images(pixels, grids)[0][:M], plain.encode_images(changed, grids)[0][:M]
        )


@pytest.mark.parametrize("kind", TOWERS)
def test_images_with_different_view_counts_in_one_batch_equal_one_by_one(kind):
    model = falcon_model(kind, seed=1).model.eval()
    pixels, grids = two_images()
    with torch.no_grad():
        together = model.encode_images(pixels, grids)
        alone = [model.encode_images(pixels[:5], grids[:1])[0], model.encode_images(pixels[5:], grids[1:])[0]]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_ragged_multi_view_batch_trains_every_part():
    from data.dataset import collate
    from tests.test_views import ragged_view_items

    built = falcon_model(seed=3)
    model, tok = built.model, built.tokenizer
    items = ragged_view_items(model, tok)
    batch = collate(items, tok.pad_token_id)
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        image_grids=batch["image_grids"],
    )
    out.loss.backward()
    falcon = model.compressors[0]
    assert falcon.registers.grad.abs().sum() > 0
    assert all(r.q_proj.weight.grad is not None for r in falcon.reatten)
    used_rows = falcon.crop_row.weight.grad.abs().sum(-1) > 0
    assert used_rows.nonzero().flatten().tolist() == [
        0,
        1,
        falcon.config.anchor_max,
    ]  # crop rows 0, 1 and whole


def test_a_stage_switches_reatten_off_for_its_duration_only():
    from models.compressors.base import Progress

    model = falcon_model().model
    falcon = model.compressors[0]
    model.set_progress(Progress(0, 10, ("lm",), {"falcon": {"reatten": False}}))
    assert not falcon.reatten_on()
    model.set_progress(None)
    assert falcon.reatten_on()


def test_a_stage_ramps_reatten_in_over_its_steps():
    """`reatten_ramp: [start, end]`: before `start` the stage's outputs are those without
    ReAtten (and ReAtten gets no gradient), half-way up the ramp its output is scaled by one
    half, from `end` on and outside training it counts in full; the scale is logged."""
    from models.compressors.base import Progress

    model = falcon_model().model.train()
    falcon = model.compressors[0]
    pixels, grids = two_images()
    stage = {"falcon": {"reatten_ramp": [0.5, 0.7]}}

    def registers_at(step: int | None) -> tuple[torch.Tensor, dict]:
        states = model.set_progress(None if step is None else Progress(step, 10, ("lm",), stage))
        with torch.no_grad():
            return torch.cat(model.encode_images(pixels, grids)), states

    off = falcon_model(reatten=False).model.train()  # same seed: same registers and tower
    with torch.no_grad():
        without = torch.cat(off.encode_images(pixels, grids))
    before, states = registers_at(4)
    assert states == {"falcon.reatten_scale": 0.0}
    torch.testing.assert_close(before, without, rtol=0, atol=0)
    model.zero_grad()
    model.set_progress(Progress(4, 10, ("lm",), stage))
    torch.cat(model.encode_images(pixels, grids)).square().mean().backward()
    assert all(p.grad is None for p in falcon.reatten.parameters())
    assert falcon.registers.grad.abs().sum() > 0

    full, states = registers_at(7)
    assert states == {"falcon.reatten_scale": 1.0}
    assert not torch.allclose(full, without)
    assert registers_at(6)[1] == {"falcon.reatten_scale": pytest.approx(0.5)}
    torch.testing.assert_close(registers_at(None)[0], full)  # outside training: in full
    # the line printed when the stage starts names the steps where the logged scale leaves 0 and reaches 1
    (line,) = falcon.describe(Progress(0, 10, ("lm",), stage))
    assert line == "ReAtten ramped in: 0 until step 5, linear to full at step 7 (of 10)"
    scales = [registers_at(step)[1]["falcon.reatten_scale"] for step in (5, 6, 7)]
    assert scales[0] == 0.0 and 0 < scales[1] < 1 and scales[2] == 1.0
    assert falcon.describe(Progress(0, 10, ("lm",), {"falcon": {"reatten": False}})) == ["ReAtten off"]
    assert falcon.describe(Progress(0, 10, ("lm",), {})) == ["ReAtten on"]
    # a switch (start = end) and an unset ramp
    assert falcon_model(reatten_ramp=[0.3, 0.3]).model.compressors[0].config.reatten_ramp == (0.3, 0.3)
    from models.compressors.falcon import ramp_value

    assert [ramp_value(f, 0.3, 0.3) for f in (0.0, 0.29, 0.3, 1.0)] == [0, 0, 1, 1]
    assert [ramp_value(f, 0.2, 0.6) for f in (0.2, 0.4, 0.6)] == [0, pytest.approx(0.5), 1]
    assert falcon_model().model.set_progress(Progress(0, 10, ("lm",), {})) == {}


def test_a_stages_reatten_ramp_is_checked_where_it_is_set():
    from train.recipe import RecipeError, load_recipe

    with pytest.raises(
        RecipeError, match=r"stages\[1\]\.components\.falcon\.reatten_ramp: give \[start, end\]"
    ):
        load_recipe("tiny/falcon-distill", ["stages.1.components={falcon: {reatten_ramp: [0.7, 0.6]}}"])
    with pytest.raises(RecipeError, match=r"model\.compressors\[0\]\.reatten_ramp: give") as err:
        load_recipe("tiny/falcon-distill", ["model.compressors.0.reatten_ramp=[0.2, 1.5]"])
    assert len(err.value.problems) == 1  # not again for each stage that sets other settings
    with pytest.raises(RecipeError, match=r"reatten_ramp: give \[start, end\] with 0 ≤ start < 1"):
        # ReAtten would stay at 0 for the whole stage, then count in full at test, untrained
        load_recipe("tiny/falcon-distill", ["stages.1.components={falcon: {reatten_ramp: [1.0, 1.0]}}"])
    load_recipe("tiny/falcon-distill", ["stages.1.components={falcon: {reatten_ramp: [0.5, 0.6]}}"])


def test_another_tower_in_the_process_is_untouched():
    model = falcon_model().model.eval()
    other = build("tiny", tiny=TEST_TINY, seed=0).model.eval()
    other.vision.model.load_state_dict(model.vision.model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = other.vision(pixels).selected
        model.encode_images(pixels)  # FALCON's hooks run on its own tower, for that call
        torch.testing.assert_close(other.vision(pixels).selected, reference)
        plain = model.vision(pixels).selected  # and its tower without the component is plain CLIP
    torch.testing.assert_close(plain, reference)


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_registers_and_crop_embeddings_start_at_init_std(std):
    falcon = falcon_model(init_std=std).model.compressors[0]
    for start in (falcon.registers, falcon.crop_row.weight, falcon.crop_col.weight):
        assert abs(start.std().item() / std - 1) < 0.25  # over a hundred draws each


def test_a_non_positive_init_std_is_refused():
    from train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"compressors\[0\]\.init_std: must be > 0"):
        load_recipe("tiny/falcon", ["model.compressors.0.init_std=0"])


def test_falcon_on_the_7b_shapes_counts_its_parameters():
    from train.recipe import REPO_ROOT

    built = build(  # with FALCON's crop indicators: a meta build has no tokenizer and needs none
        str(REPO_ROOT / "models/configs/llava-1.5-7b-hf"),
        compressors=[ComponentSpec("falcon")],
        device="meta",
        views=MultiViewConfig(((2, 2),), newline=False, indicators=CropIndicators()),
    )
    assert built.model.visual_tokens((2, 2)) == 5 * 64
    summary = built.model.compressors[0].parameter_summary()
    assert summary["registers"] == 64 * 1024
    assert summary["reatten_per_layer"] == 4 * 1024 * 1024 + 4 * 1024 and summary["reatten_layers"] == 24


def test_export_loads_back_trained_registers_and_reatten(tmp_path):
    from models.export import export, load_pretrained

    built = falcon_model(seed=4)
    falcon = built.model.compressors[0]
    with torch.no_grad():  # as training would leave them: not what a fresh build draws or copies
        falcon.registers.add_(0.5)
        falcon.reatten[1].q_proj.weight.mul_(1.5)
    spec = ComponentSpec("falcon", {"registers": M, "reatten": True})
    export(built, tmp_path / "export", ComponentSpec("mlp2x_gelu"), [spec], "tiny")
    loaded = load_pretrained(tmp_path / "export").model
    assert torch.equal(loaded.compressors[0].reatten[1].q_proj.weight, falcon.reatten[1].q_proj.weight)
    pixels, grids = two_images()
    with torch.no_grad():
        for a, b in zip(
            loaded.encode_images(pixels, grids), built.model.eval().encode_images(pixels, grids), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_survive_gradient_checkpointing():
    """The 7B recipes checkpoint the LLM and the tower (`vtc plan`: stage 1 needs ~420 GiB per GPU
    without): the registers' and ReAtten's gradients are the same with it."""
    from data.dataset import collate
    from tests.test_views import ragged_view_items

    built = falcon_model(seed=3)
    batch = collate(ragged_view_items(built.model, built.tokenizer), built.tokenizer.pad_token_id)

    def gradients(checkpoint: bool) -> dict[str, torch.Tensor]:
        model = falcon_model(seed=3).model.train()
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(("compressors.", "projector.")))
        model.set_gradient_checkpointing(llm=checkpoint, vision=checkpoint)
        keys = ("input_ids", "attention_mask", "pixel_values", "labels")
        model(*(batch[k] for k in keys), image_grids=batch["image_grids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert "compressors.0.registers" in plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_distill_targets_pool_the_patch_map_into_the_most_square_grid():
    from models.compressors.falcon import distill_map, pooled_targets

    assert [distill_map(m) for m in (64, 36, 7, 4, 2, 1)] == [(8, 8), (6, 6), (2, 3), (2, 2), (1, 2), (1, 1)]
    plain = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)  # two 4×4 maps, width 3
    targets = pooled_targets(plain, 4)  # 2×2 regions of 2×2 patches
    maps = plain.view(2, 4, 4, 3)
    by_hand = torch.stack([maps[:, r : r + 2, c : c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    torch.testing.assert_close(targets, by_hand)
    with pytest.raises(ValueError, match="square"):
        pooled_targets(plain[:, :15], 4)


@pytest.mark.parametrize("kind", TOWERS)
def test_distill_matches_registers_to_the_plain_towers_pooled_features(kind):
    """In a distilling stage the loss is MSE(first a·b registers, pooled plain features) / var,
    the plain features come from the tower with its LoRA adapters off and carry no gradient,
    and the adapters' trainability is left as it was; outside training nothing is added."""
    from models.compressors.base import Progress
    from models.compressors.falcon import pooled_targets
    from models.lora import inject_lora

    model = falcon_model(kind, seed=1).model
    falcon = model.compressors[0]
    inject_lora(model.vision, "vision", r=4, alpha=8, dropout=0.0)
    for name, param in model.vision.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:  # adapters that change the tower, so "off" is visible
            torch.nn.init.normal_(param, std=0.5)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model.vision(pixels).selected
    model.train().set_progress(Progress(0, 10, ("lm", "register_distill")))
    model.encode_images(pixels)
    loss = model.pop_aux_losses()["register_distill"]
    lora = [p for n, p in model.vision.named_parameters() if "lora_" in n and "encoder.layers" in n]
    assert all(p.requires_grad for p in lora)  # the teacher pass put trainability back
    with torch.no_grad():
        plain = falcon_model(kind, seed=1).model.vision(pixels).selected  # no adapters at all
        student = model.vision(pixels, encoder=falcon, in_layers=[falcon]).selected
    model.pop_aux_losses()
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapters do change the tower
    target = pooled_targets(plain, M)
    expected = torch.nn.functional.mse_loss(student[:, : target.shape[1]], target) / target.var()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert falcon.registers.grad.abs().sum() > 0 and all(p.grad is not None for p in lora)
    for progress in (Progress(0, 10, ("lm",)), None):  # a stage without it, and outside training
        model.set_progress(progress)
        model.encode_images(pixels)
        assert "register_distill" not in model.pop_aux_losses()


@pytest.mark.slow
def test_tiny_distill_recipe_distils_the_registers_then_instructs(tmp_path):
    """`tiny/falcon-distill`: its first stage minimises the register distillation alone (the
    logged loss is that term), with the LLM frozen and the tower learning through LoRA; the
    instruction stage then minimises the LM loss and answers every test question."""
    import csv

    from train.recipe import load_recipe
    from train.run import run_recipe

    overrides = [
        f"output={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.synthetic.train=32",
        "data.synthetic.test=2",
        "data.num_workers=0",
        "trainer.log_every=1",
        "eval.limit=1",
        *(f"stages.{i}.{key}" for i in (0, 1) for key in ("steps=2", "batch_size=2")),
    ]
    recipe = load_recipe("tiny/falcon-distill", overrides)
    assert [s.objective for s in recipe.stages] == ["aux", "lm"]
    metrics = run_recipe(recipe)
    assert metrics["count"] == 5  # the one test image's five questions

    def logged(stage: str) -> list[dict]:
        with open(tmp_path / "run" / "logs" / stage / "metrics.csv") as f:
            return [row for row in csv.DictReader(f) if row.get("train/loss")]

    distill, instruct = logged("distill"), logged("instruct")
    assert len(distill) == 2 and len(instruct) == 2
    for row in distill:
        assert float(row["train/loss"]) == float(row["train/register_distill"]) > 0
    assert all(not row.get("train/register_distill") for row in instruct)


def test_bench_places_each_answer_on_the_cells_it_rests_on(monkeypatch):
    """bench/falcon.py's "across crops" group: a grounded answer rests on the cells it names; a
    `match` answer (the dot's colour, then a shape) on the dot and the one object of that colour."""
    monkeypatch.syspath_prepend("bench")
    from falcon import cells_of_answer, crops_holding  # bench/falcon.py

    scene = {
        "grid": 8,
        "dot": [0, 1, "red"],
        "objects": [
            {"row": 6, "col": 7, "colour": "red", "shape": "circle", "size": "large"},
            {"row": 1, "col": 1, "colour": "blue", "shape": "square", "size": "small"},
        ],
    }
    match = cells_of_answer("match", "red . circle", scene)
    assert match == [(0, 1), (6, 7)] and crops_holding(match, grid=8) == {(0, 0), (1, 1)}
    count = cells_of_answer("count", "b2 . 1", scene)
    assert count == [(1, 1)] and crops_holding(count, grid=8) == {(0, 0)}


def test_bench_pairs_two_runs_question_by_question(monkeypatch, tmp_path):
    """bench/falcon.py --paired: per group, the questions only one run gets right, and the exact
    McNemar p (a two-sided binomial test at 1/2 on those); runs scored on other questions are
    refused."""
    monkeypatch.syspath_prepend("bench")
    from falcon import paired  # bench/falcon.py

    from train.accuracy import exact_mcnemar  # the one `vtc evaluate --setting` uses too

    assert exact_mcnemar(0, 6) == 2 / 2**6  # all six discordant one way: 2 · (1/2)^6
    assert exact_mcnemar(9, 1) == exact_mcnemar(1, 9) == 2 * (1 + 10) / 2**10
    assert exact_mcnemar(5, 5) == exact_mcnemar(0, 0) == 1.0

    def write(name, rights, questions=("q0", "q1", "q2", "q3")):
        groups = [["count", "across crops"], ["count"], ["shape", "across crops"], ["shape"]]
        rows = [
            {"id": f"{i}-0", "question": q, "reference": "yes", "groups": g, "right": r}
            for i, (q, g, r) in enumerate(zip(questions, groups, rights, strict=True))
        ]
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(tmp_path / name)

    a, b = write("a.jsonl", [True, True, False, True]), write("b.jsonl", [False, True, True, True])
    rows = {r["group"]: r for r in paired(a, b)}
    assert list(rows) == ["all", "across crops", "count", "shape"]
    assert (rows["all"]["n"], rows["all"]["only_a"], rows["all"]["only_b"]) == (4, 1, 1)
    assert rows["across crops"] | {"p": None} == {
        "group": "across crops",
        "n": 2,
        "a": 0.5,
        "b": 0.5,
        "only_a": 1,
        "only_b": 1,
        "p": None,
    }
    assert (rows["count"]["a"], rows["count"]["b"], rows["count"]["p"]) == (1.0, 0.5, 1.0)
    other = write("c.jsonl", [True] * 4, questions=("q0", "q1", "q2", "another"))
    with pytest.raises(SystemExit, match="not scored on the same questions"):
        paired(a, other)
    with pytest.raises(SystemExit, match="no scored answers"):
        paired(str(tmp_path), b)


def test_bench_summarises_pairs_over_seeds(monkeypatch, tmp_path, capsys):
    """bench/falcon.py --paired with one pair per seed: B − A of each pair, their mean and
    spread, and the exact sign-flip p, which 2^n sign flips bound below by 2 / 2^n."""
    monkeypatch.syspath_prepend("bench")
    from falcon import over_pairs, paired, print_paired, sign_flip_p  # bench/falcon.py

    assert sign_flip_p([3.0, 1.0, 2.0]) == 2 / 8  # only all-plus and all-minus reach |6|
    assert sign_flip_p([50.0, 25.0, -25.0]) == 6 / 8  # ±50 ±25 ±25: only the two sums of 0 stay below 50
    assert sign_flip_p([1.0, -1.0]) == 1.0

    def write(name, rights):
        groups = [["count", "across crops"], ["count"], ["shape", "across crops"], ["shape"]]
        rows = [
            {"id": f"{i}-0", "question": f"q{i}", "reference": "yes", "groups": g, "right": r}
            for i, (g, r) in enumerate(zip(groups, rights, strict=True))
        ]
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(tmp_path / name)

    # seed by seed, B − A on all four questions: +50, +25, −25 points
    paths = [
        write("a0.jsonl", [False, False, True, True]),
        write("b0.jsonl", [True, True, True, True]),
        write("a1.jsonl", [False, True, False, True]),
        write("b1.jsonl", [True, True, False, True]),
        write("a2.jsonl", [True, True, True, False]),
        write("b2.jsonl", [True, False, True, False]),
    ]
    summary = {
        r["group"]: r
        for r in over_pairs([paired(a, b) for a, b in zip(paths[::2], paths[1::2], strict=True)])
    }
    everything = summary["all"]
    assert everything["b_minus_a"] == [50.0, 25.0, -25.0]
    assert everything["mean"] == pytest.approx(50 / 3)
    assert everything["sd"] == pytest.approx(38.188, abs=1e-3)  # sample sd of 50, 25, −25
    assert everything["se"] == pytest.approx(everything["sd"] / 3**0.5)
    assert (everything["b_ahead"], everything["p"], everything["n"]) == (2, 6 / 8, [4, 4, 4])
    assert summary["across crops"]["b_minus_a"] == [50.0, 50.0, 0.0]  # questions 0 and 2
    assert summary["count"]["b_minus_a"] == [100.0, 50.0, -50.0]

    print_paired(paths)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("A = ") for line in lines) == 3
    assert "| all | +50.0, +25.0, -25.0 | +16.7 | 38.2 | 22.0 | 2 of 3 | 0.75 |" in lines
    other = tmp_path / "other.jsonl"  # the same questions, none of them across crops
    other.write_text((tmp_path / "a0.jsonl").read_text().replace('"across crops"', '"detail"'))
    with pytest.raises(SystemExit, match="same groups"):
        over_pairs([paired(paths[0], paths[1]), paired(str(other), str(other))])
