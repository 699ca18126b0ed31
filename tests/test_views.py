"""Images as several views (models/views.py): grid choice, crops, the layout each component sees,
the token layout for the LLM, and multi-view batches with any projector end to end."""

import io

import pytest
import torch
from PIL import Image

import tests.components  # noqa: F401  (registers the test components)
from data.dataset import collate, load_views
from data.errors import UserError
from data.subimages import Tiling, select_grid, select_grid_by_shape, thumbnail_and_crops
from data.synth import FAMILIES
from models.build import ComponentSpec, build
from models.export import export, load_pretrained
from models.sequence import CONTEXT, PROMPT, VISUAL
from models.views import WHOLE, CropIndicators, ImageTokens, MultiViewConfig, ViewLayout
from tests.conftest import TEST_TINY

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]


@pytest.mark.parametrize(
    "size,expected",
    [((64, 64), (1, 1)), ((128, 128), (2, 2)), ((128, 64), (1, 2)), ((64, 200), (3, 1)), ((300, 90), (1, 3))],
)
def test_select_grid_keeps_most_pixels_then_least_padding(size, expected):
    assert select_grid(*size, GRIDS, 64) == expected


def test_crops_tile_the_image_in_raster_order():
    image = Image.new("RGB", (128, 128))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        image.paste(colour, ((i % 2) * 64, (i // 2) * 64, (i % 2) * 64 + 64, (i // 2) * 64 + 64))
    for fit in ("anyres", "shape_match"):
        views, grid = thumbnail_and_crops(image, Tiling(tuple(GRIDS), fit), 64, (0, 0, 0))
        assert grid == (2, 2) and len(views) == 5 and all(v.size == (64, 64) for v in views)
        assert [v.getpixel((32, 32)) for v in views[1:]] == [
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (255, 255, 0),
        ]
        assert views[0].getpixel((16, 16)) == (255, 0, 0) and views[0].getpixel((48, 48)) == (255, 255, 0)


@pytest.mark.parametrize(
    "size,grids,expected",
    [
        ((128, 64), GRIDS, (1, 2)),  # the shape matches exactly
        ((64, 200), GRIDS, (3, 1)),
        ((256, 256), GRIDS, (2, 2)),  # (1, 1) and (2, 2) share the shape: the closer size wins
        ((300, 150), [(1, 2), (3, 3)], (1, 2)),  # anyres takes (3, 3): it keeps more pixels
        ((128, 128), [(2, 2), (1, 1), (2, 2)], (2, 2)),
    ],
)
def test_select_grid_by_shape_matches_shape_then_size(size, grids, expected):
    assert select_grid_by_shape(*size, grids, 64) == expected


GRID_4 = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]  # FALCON's grid_4, in order


@pytest.mark.parametrize(
    "size,expected",
    [((517, 510), (2, 2)), ((464, 651), (1, 1)), ((464, 134), (1, 4)), ((570, 463), (2, 2))],
)
def test_shape_match_breaks_near_ties_as_falcons_code_does(size, expected):
    """Sizes where exact arithmetic picks another grid (517 × 510: one 384 px crop, whose size is
    closer) than FALCON's processor, which cuts the aspect box's height to whole pixels; these
    are its choices (`bench/falcon_authors.py` compares 3,528 sizes with its code)."""
    assert select_grid_by_shape(*size, GRID_4, 384) == expected


def test_shape_match_stretches_the_image_where_anyres_pads_it():
    """A 2:1 red image on grids whose best canvas is square: anyres pads it (the fill shows in the
    thumbnail and in the crops), shape_match stretches it (red everywhere)."""
    image = Image.new("RGB", (256, 128), (255, 0, 0))
    grids = ((2, 2),)
    padded, grid = thumbnail_and_crops(image, Tiling(grids, "anyres"), 64, (0, 0, 255))
    stretched, same = thumbnail_and_crops(image, Tiling(grids, "shape_match"), 64, (0, 0, 255))
    assert grid == same == (2, 2)
    assert padded[0].getpixel((32, 2)) == (0, 0, 255) and padded[1].getpixel((32, 2)) == (0, 0, 255)
    assert all(v.getpixel((x, y)) == (255, 0, 0) for v in stretched for x in (0, 63) for y in (0, 63))


@pytest.mark.parametrize("fit", ["anyres", "shape_match"])
def test_a_stage_on_whole_images_sees_the_thumbnail_of_its_fit(fit):
    """`views: false` (FALCON's first stage): each image is one view, fitted as the model's
    thumbnail is; with anyres that is LLaVA's padded whole image, as before `fit` existed."""
    data = png((128, 64))
    whole, grid = load_views(data, 64, Tiling(((2, 2),), fit).whole_images())
    views, _ = load_views(data, 64, Tiling(((2, 2),), fit))
    assert grid is None and whole.shape == (3, 64, 64) and torch.equal(whole, views[0])
    if fit == "anyres":
        assert torch.equal(whole, load_views(data, 64)[0])
    else:
        assert not torch.equal(whole, load_views(data, 64)[0])


def test_square_images_on_square_grids_split_the_same_either_way():
    """Why switching the tiny FALCON recipes to shape_match changed no figure: their scenes are
    square and their grids square, so both fits give the same pixels."""
    for side, grids in ((128, ((2, 2),)), (192, ((3, 3),)), (256, ((4, 4),))):  # the benches' settings
        data = png((side, side))
        anyres = load_views(data, 64, Tiling(grids, "anyres"))
        shape_match = load_views(data, 64, Tiling(grids, "shape_match"))
        assert anyres[1] == shape_match[1] and torch.equal(anyres[0], shape_match[0])
        whole = [
            load_views(data, 64, Tiling(grids, fit).whole_images())[0] for fit in ("anyres", "shape_match")
        ]
        assert torch.equal(*whole)  # FALCON's first stage (`views: false`) too


# Crop indicators in words the tiny tokenizer knows (FALCON's own are `<global_img>`, ...).
TINY_INDICATORS = CropIndicators(whole="objects :", crop="at {row} {col} :")


def views_model(projector="tokenpacker", compressors=(), seed=0, newline=True, indicators=None, fit="anyres"):
    params = {"scale": 2} if projector == "tokenpacker" else {}
    specs = [c if isinstance(c, ComponentSpec) else ComponentSpec(c) for c in compressors]
    return build(
        "tiny",
        projector=ComponentSpec(projector, params),
        compressors=specs,
        tiny=TEST_TINY,
        seed=seed,
        views=MultiViewConfig(tuple(GRIDS), newline, indicators, fit),
    )


def numbered_views(count, tokens, width):
    """(count, tokens, width) where every token's features all equal its running number."""
    return (
        torch.arange(count * tokens, dtype=torch.float32)[:, None]
        .expand(-1, width)
        .reshape(count, tokens, width)
    )


def test_layout_says_which_image_and_crop_each_view_is():
    layout = ViewLayout.from_grids(torch.tensor([[2, 2], [1, 2]]))
    assert layout.image.tolist() == [0] * 5 + [1] * 3
    assert layout.row.tolist() == [WHOLE, 0, 0, 1, 1, WHOLE, 0, 0]
    assert layout.col.tolist() == [WHOLE, 0, 1, 0, 1, WHOLE, 0, 1]
    assert layout.views_per_image() == [5, 3] and layout.is_crop.sum() == 6


def test_crop_maps_are_laid_out_as_one_map_with_newlines():
    model = views_model().model
    arranger, r, width = model.views, 4, TEST_TINY.llm_width  # 8×8 patches at scale 2 → 4×4 per view
    views = numbered_views(5, r * r, width)
    (out,) = arranger.arrange(views, ViewLayout.from_grids(torch.tensor([[2, 2]])), side=r)
    assert out.shape[0] == model.visual_tokens((2, 2)) == 16 + 8 * 9
    assert torch.equal(out[:16], views[0])
    line = out[16 : 16 + 9]  # first token line: crop (0,0) row 0, crop (0,1) row 0, newline
    assert (
        line[:4, 0].tolist() == views[1, :4, 0].tolist() and line[4:8, 0].tolist() == views[2, :4, 0].tolist()
    )
    assert torch.equal(line[8], arranger.image_newline)
    last = out[-9:]  # last line: crop (1,0) row 3, crop (1,1) row 3, newline
    assert (
        last[:4, 0].tolist() == views[3, 12:, 0].tolist()
        and last[4:8, 0].tolist() == views[4, 12:, 0].tolist()
    )


@pytest.mark.parametrize("newline", [True, False])
def test_tokens_that_are_no_map_follow_crop_by_crop(newline):
    model = views_model("mlp2x_gelu", ["test_view_registers"], newline=newline).model
    per_view = model.vision.num_patches + 1  # the encoder component's patches + register: no square map
    assert model._view_side() is None
    views = numbered_views(1 + 2, per_view, TEST_TINY.llm_width)
    (out,) = model.views.arrange(views, ViewLayout.from_grids(torch.tensor([[1, 2]])), side=None)
    assert out.shape[0] == model.visual_tokens((1, 2)) == 3 * per_view + newline
    assert torch.equal(out[: 3 * per_view], views.flatten(0, 1))  # thumbnail, crop (0,0), crop (0,1)
    if newline:
        assert torch.equal(out[-1], model.views.image_newline)


def test_encoder_components_see_the_layout_inside_every_layer():
    """The views of one image exchange information through the component; other images do not."""
    model = views_model("mlp2x_gelu", ["test_view_registers"]).model.eval()
    pixels = torch.randn(5 + 3, 3, 64, 64)
    grids = torch.tensor([[2, 2], [1, 2]])
    with torch.no_grad():
        before = model.encode_images(pixels, grids)
        changed = pixels.clone()
        changed[3] += 1.0  # crop (1, 0) of image 0
        after = model.encode_images(changed, grids)
    component = model.compressors[0]
    seen = component.seen[-1]
    assert seen.image.tolist() == [0] * 5 + [1] * 3 and seen.row.tolist()[:5] == [WHOLE, 0, 0, 1, 1]
    per_view = model.vision.num_patches + 1
    assert not torch.allclose(before[0][:per_view], after[0][:per_view])  # image 0's thumbnail changed
    assert torch.equal(before[1], after[1])  # image 1 untouched
    loss = model.encode_images(pixels, grids)[1].sum()
    loss.backward()
    used = component.position.weight.grad.abs().sum(-1) > 0
    assert used.nonzero().flatten().tolist() == [0, 1, 2]  # whole, crop (0,0), crop (0,1) of image 1


def png(size):
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def ragged_view_items(model, tok) -> list[dict]:
    """Dataset items of a 2×2-crop image and a 1×2-crop image with prompts of 9 and 5 tokens."""
    items = []
    for size in ((128, 128), (128, 64)):
        pixels, grid = load_views(png(size), 64, model.view_tiling)
        ids = [tok.bos_token_id, model.image_token_id] + tok(
            "What colour is the dot ?", add_special_tokens=False
        ).input_ids
        items.append(
            {"id": str(size), "input_ids": ids, "labels": ids, "pixel_values": pixels, "image_grid": grid}
        )
    items[1]["input_ids"] = items[1]["labels"] = items[1]["input_ids"][:5]
    return items


LLAVOLTA = ComponentSpec(
    "llavolta", {"schedule": [{"layer": 1, "stride": 3}], "inference": {"layer": 1, "stride": 3}}
)


@pytest.mark.parametrize(
    "projector,compressors,indicators",
    [
        ("tokenpacker", [], None),
        ("mlp2x_gelu", [], None),
        ("mlp2x_gelu", ["test_view_registers"], None),
        ("tokenpacker", [], TINY_INDICATORS),
        ("mlp2x_gelu", [LLAVOLTA], TINY_INDICATORS),
    ],
)
def test_ragged_multi_view_batch_forward_and_cached_generation(projector, compressors, indicators):
    built = views_model(projector, compressors, seed=2, indicators=indicators)
    model, tok = built.model.eval(), built.tokenizer
    items = ragged_view_items(model, tok)
    batch = collate(items, tok.pad_token_id)
    assert batch["image_grids"].tolist() == [[2, 2], [1, 2]] and batch["pixel_values"].shape[0] == 5 + 3
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        image_grids=batch["image_grids"],
    )
    assert out.visual_tokens_in.tolist() == [model.visual_tokens((2, 2)), model.visual_tokens((1, 2))]
    assert torch.isfinite(out.loss)
    generated, _, _ = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new_tokens=3,
        image_grids=batch["image_grids"],
    )
    views = batch["pixel_values"].split([5, 3])
    for b, item in enumerate(items):
        seq = list(item["input_ids"])
        for t in range(3):
            with torch.no_grad():
                logits = model(
                    torch.tensor([seq]),
                    torch.ones(1, len(seq), dtype=torch.bool),
                    views[b],
                    return_logits=True,
                    image_grids=batch["image_grids"][b : b + 1],
                ).logits
            logits[0, -1, model.image_token_id] = float("-inf")  # generate never emits <image>
            assert int(logits[0, -1].argmax()) == int(generated[b, t])
            seq.append(int(generated[b, t]))


@pytest.mark.slow
@pytest.mark.parametrize("indicators,fit", [(None, "anyres"), (TINY_INDICATORS, "shape_match")])
def test_export_keeps_the_views_and_their_newline(tmp_path, indicators, fit):
    built = views_model("mlp2x_gelu", seed=3, indicators=indicators, fit=fit)
    with torch.no_grad():
        built.model.views.image_newline.add_(1.0)  # not the value a fresh build would draw
    export(built, tmp_path / "export", ComponentSpec("mlp2x_gelu"), [], "tiny")
    loaded = load_pretrained(tmp_path / "export").model
    assert loaded.view_grids == built.model.view_grids
    assert loaded.views.config == built.model.views.config and loaded.view_tiling.fit == fit
    assert torch.equal(loaded.views.image_newline, built.model.views.image_newline)
    pixels, grids = torch.randn(5, 3, 64, 64), torch.tensor([[2, 2]])
    with torch.no_grad():
        (mine,), (theirs,) = (
            loaded.encode_images(pixels, grids),
            built.model.eval().encode_images(pixels, grids),
        )
    if indicators is not None:
        assert torch.equal(mine.is_visual, theirs.is_visual)
        mine, theirs = mine.embeds, theirs.embeds
    assert torch.equal(mine, theirs)


def test_views_newline_trains_with_the_projector():
    from train.freeze import apply_stage
    from train.recipe import Freeze, Stage

    model = views_model("mlp2x_gelu").model
    apply_stage(model, Stage("s", train=Freeze(projector="full")))
    assert model.views.image_newline.requires_grad
    apply_stage(model, Stage("s", train=Freeze(projector="frozen")))
    assert not model.views.image_newline.requires_grad


def views_recipe(tmp_path, projector: dict, views: dict):
    """A seconds-long run of a small tiny model on 128 px scenes through `views`."""
    from train.recipe import recipe_from_dict

    return recipe_from_dict(
        {
            "description": "hd",
            "output": str(tmp_path / "run"),
            "model": {
                "base": "tiny",
                "tiny": {
                    "vision_width": 32,
                    "vision_layers": 2,
                    "vision_heads": 2,
                    "llm_width": 64,
                    "llm_layers": 2,
                    "llm_heads": 2,
                },
                "projector": projector,
                "views": views,
            },
            "data": {
                "synthetic": {"train": 64, "test": 4, "image_size": 128},
                "num_workers": 0,
                "cache_dir": str(tmp_path / "data"),
            },
            "stages": [{"name": "instruct", "steps": 4, "batch_size": 4, "train": {"llm": "full"}}],
            "trainer": {"threads": 2},
            "eval": {"limit": 4},
        }
    )


@pytest.mark.parametrize("indicators", [False, True])
def test_multi_view_recipe_trains_and_evaluates_end_to_end(tmp_path, indicators):
    from train.run import run_recipe

    views = {"grids": [[1, 1], [2, 2]]}
    if indicators:
        views["indicators"] = {"whole": TINY_INDICATORS.whole, "crop": TINY_INDICATORS.crop}
    recipe = views_recipe(tmp_path, {"name": "tokenpacker", "scale": 2}, views)
    metrics = run_recipe(recipe)
    # thumbnail + 2×2 crops as 8 lines of 8 + newline; with indicators crop by crop, a newline
    # after each row of crops
    assert metrics["visual_tokens"] == (16 + 4 * 16 + 2 if indicators else 16 + 8 * 9)
    assert metrics["count"] == 4 * len(FAMILIES)


def test_a_run_of_the_mlp_on_views_is_evaluated_with_its_views(tmp_path):
    """The MLP projector with views is no plain LLaVA: its run writes no RUN/hf, which would
    hold the model without its views, and `vtc evaluate RUN` measures it as training did (it
    measured RUN/hf, the model on one view, until 2026-12-07)."""
    from train.evaluate import Settings, evaluate
    from train.run import run_recipe

    recipe = views_recipe(tmp_path, {"name": "mlp2x_gelu"}, {"grids": [[1, 1], [2, 2]]})
    metrics = run_recipe(recipe)
    assert not (tmp_path / "run" / "hf").exists()
    settings = Settings(limit=recipe.eval.limit, timing=False)
    report = evaluate(
        str(tmp_path / "run"), [], out_dir=tmp_path / "report", settings=settings, baseline="none"
    )
    (row,) = report["rows"]
    # 2 × 2 crops as 16 lines of 16 tokens, each with its newline, after the thumbnail's 64
    assert row["visual_tokens"] == metrics["visual_tokens"] == 64 + 16 * 17
    assert row["per_family"] == metrics["per_family"]


def test_recipe_errors_name_the_views_keys():
    from train.recipe import RecipeError, recipe_from_dict

    recipe = {
        "description": "x",
        "output": "o",
        "model": {"views": {"grids": [[2, 2]]}},
        "stages": [{"name": "v", "objective": "region", "steps": 1, "train": {"vision": "full"}}],
    }
    with pytest.raises(RecipeError, match="stages\\[0\\].objective"):
        recipe_from_dict(recipe)
    recipe["model"]["views"]["grids"] = [[2, 0]]
    recipe["stages"][0]["objective"] = "lm"
    with pytest.raises(RecipeError, match="model.views.grids"):
        recipe_from_dict(recipe)


def test_crop_indicators_name_each_view_as_text_before_its_tokens():
    model = views_model("mlp2x_gelu", ["test_view_registers"], indicators=TINY_INDICATORS).model
    per_view = model.vision.num_patches + 1
    views = numbered_views(1 + 4, per_view, TEST_TINY.llm_width)
    (out,) = model.views.arrange(views, ViewLayout.from_grids(torch.tensor([[2, 2]])), None, model.llm.embed)
    assert isinstance(out, ImageTokens)
    text = {
        (WHOLE, WHOLE): ["objects", ":"],
        **{(r, c): ["at", str(r), str(c), ":"] for r in range(2) for c in range(2)},
    }
    expected_visual, expected = [], []
    for i, (row, col) in enumerate([(WHOLE, WHOLE), (0, 0), (0, 1), (1, 0), (1, 1)]):
        ids = model.views.indicator_ids[row, col]
        assert len(ids) == len(text[row, col])
        expected.append(model.llm.embed(torch.tensor(ids)))
        expected.append(views[i])
        expected_visual += [False] * len(ids) + [True] * per_view
        if col == 1:  # the newline ends each row of crops
            expected.append(model.views.image_newline[None])
            expected_visual.append(True)
    assert torch.equal(out.embeds, torch.cat(expected))
    assert out.is_visual.tolist() == expected_visual
    assert int(out.is_visual.sum()) == model.visual_tokens((2, 2)) == 5 * per_view + 2
    assert model.views.text_tokens((2, 2)) == 2 + 4 * 4
    assert model.image_sequence_tokens((2, 2)) == model.visual_tokens((2, 2)) + 18


def prepared(model, batch):
    """The model's sequence state for a collated multi-view batch, without gradients."""
    with torch.no_grad():
        return model.prepare(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            image_grids=batch["image_grids"],
        )


def test_crop_indicators_are_text_in_the_merged_sequence():
    """Every view is its own span of visual tokens; the indicators are context, never prompt."""
    built = views_model("mlp2x_gelu", indicators=TINY_INDICATORS, seed=1)
    model, tok = built.model.eval(), built.tokenizer
    items = ragged_view_items(model, tok)
    batch = collate(items, tok.pad_token_id)
    state = prepared(model, batch)
    for b, views in enumerate((5, 3)):
        spans = state.visual_spans(b)
        assert len(spans) == views
        first, last = spans[0][0], spans[-1][1]
        role = state.role[b]
        inside = torch.arange(first, last)
        between = inside[~state.visual_mask[b, first:last]]
        assert len(between) == model.views.text_tokens(tuple(batch["image_grids"][b].tolist())) - 2
        assert (role[between] == CONTEXT).all() and (role[state.visual_mask[b]] == VISUAL).all()
        ids = batch["input_ids"][b][batch["attention_mask"][b]]
        after_image = len(ids) - 2  # the text after <image>: the prompt
        assert int((role == PROMPT).sum()) == after_image
        assert int(state.attention_mask[b].sum()) == len(ids) - 1 + model.image_sequence_tokens(
            tuple(batch["image_grids"][b].tolist())
        )


def test_llavolta_pools_each_span_of_a_split_image_on_its_own():
    built = views_model("mlp2x_gelu", [LLAVOLTA], indicators=TINY_INDICATORS, seed=1)
    model, tok = built.model.eval(), built.tokenizer
    batch = collate(ragged_view_items(model, tok)[:1], tok.pad_token_id)
    state = prepared(model, batch)
    with torch.no_grad():
        pooled = model.compressors[0].before_layer(1, state)
    spans = state.visual_spans(0)
    assert len(pooled.visual_spans(0)) == len(spans) == 5
    for (start, end), (new_start, new_end) in zip(spans, pooled.visual_spans(0), strict=True):
        groups = torch.arange(start, end).split(3)
        assert new_end - new_start == len(groups)
        for g, column in zip(groups, range(new_start, new_end), strict=True):
            assert torch.allclose(pooled.hidden[0, column], state.hidden[0, g].mean(0), atol=1e-6)
            assert int(pooled.position_ids[0, column]) == int(state.position_ids[0, g].float().mean())
    text = state.attention_mask[0] & ~state.visual_mask[0]
    assert torch.equal(pooled.hidden[0][~pooled.visual_mask[0]], state.hidden[0][text])


def test_crop_indicators_the_tokenizer_cannot_write_are_a_clear_error():
    with pytest.raises(UserError, match="model.views.indicators.*<global_img>"):
        views_model("mlp2x_gelu", indicators=CropIndicators())  # FALCON's own: unknown words here
    with pytest.raises(UserError, match="tokenize the same"):
        views_model("mlp2x_gelu", indicators=CropIndicators("at 0 0 :", "at {row} {col} :"))


def test_recipe_errors_name_the_indicator_keys():
    from train.recipe import RecipeError, recipe_from_dict

    recipe = {
        "description": "x",
        "output": "o",
        "model": {"views": {"grids": [[2, 2]], "indicators": {"crop": "crop {row}"}}},
        "stages": [{"name": "v", "steps": 1}],
    }
    with pytest.raises(RecipeError, match="model.views.indicators.crop.*both"):
        recipe_from_dict(recipe)
    recipe["model"]["views"]["indicators"] = {"crop": "crop {row} {column}"}
    with pytest.raises(RecipeError, match="model.views.indicators.crop"):
        recipe_from_dict(recipe)
    recipe["model"]["views"]["indicators"] = {}  # FALCON's own strings
    assert recipe_from_dict(recipe).model.views.indicators == CropIndicators()


def test_views_written_before_fit_existed_read_as_anyres():
    old = {"grids": [[1, 2], [2, 2]], "newline": True}  # an export's `views` before 2026-12-06
    assert MultiViewConfig.from_dict(old).tiling == Tiling(((1, 2), (2, 2)), "anyres")


def test_an_unknown_fit_is_refused():
    with pytest.raises(ValueError, match="shape_match"):
        Tiling(((2, 2),), "stretch")
