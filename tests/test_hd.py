"""High-resolution views: grid choice, crops, TokenPacker's HD layout, and HD batches end to end."""

import io

import pytest
import torch
from PIL import Image

from data.dataset import collate, load_views
from data.subimages import hd_views, select_grid
from models.build import ComponentSpec, build
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
    views, grid = hd_views(image, GRIDS, 64, (0, 0, 0))
    assert grid == (2, 2) and len(views) == 5 and all(v.size == (64, 64) for v in views)
    assert [v.getpixel((32, 32)) for v in views[1:]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    assert views[0].getpixel((16, 16)) == (255, 0, 0) and views[0].getpixel((48, 48)) == (255, 255, 0)


def hd_model(seed=0):
    spec = ComponentSpec("tokenpacker", {"scale": 2, "hd_grids": [list(g) for g in GRIDS]})
    return build("tiny", projector=spec, tiny=TEST_TINY, seed=seed)


def test_arrange_lays_crops_out_as_one_map_with_newlines():
    model = hd_model().model
    packer = model.projector
    r, width = 4, TEST_TINY.llm_width  # 8×8 patches at scale 2 → 4×4 tokens per view
    views = torch.arange(5 * r * r, dtype=torch.float32)[:, None].expand(-1, width).reshape(5, r * r, width)
    out = packer.arrange(views, (2, 2))
    assert out.shape[0] == packer.hd_tokens((2, 2)) == 16 + 8 * 9
    assert torch.equal(out[:16], views[0])
    line = out[16 : 16 + 9]  # first token line: crop (0,0) row 0, crop (0,1) row 0, newline
    assert (
        line[:4, 0].tolist() == views[1, :4, 0].tolist() and line[4:8, 0].tolist() == views[2, :4, 0].tolist()
    )
    assert torch.equal(line[8], packer.image_newline)
    last = out[-9:]  # last line: crop (1,0) row 3, crop (1,1) row 3, newline
    assert (
        last[:4, 0].tolist() == views[3, 12:, 0].tolist()
        and last[4:8, 0].tolist() == views[4, 12:, 0].tolist()
    )


def png(size):
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_ragged_hd_batch_forward_and_cached_generation():
    built = hd_model(seed=2)
    model, tok = built.model.eval(), built.tokenizer
    items = []
    for size in ((128, 128), (128, 64)):
        pixels, grid = load_views(png(size), 64, model.hd_grids)
        ids = [tok.bos_token_id, model.image_token_id] + tok(
            "What colour is the dot ?", add_special_tokens=False
        ).input_ids
        items.append(
            {"id": str(size), "input_ids": ids, "labels": ids, "pixel_values": pixels, "image_grid": grid}
        )
    items[1]["input_ids"] = items[1]["labels"] = items[1]["input_ids"][:5]
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
    generated, _ = model.generate(
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
def test_hd_recipe_trains_and_evaluates_end_to_end(tmp_path):
    from train.recipe import recipe_from_dict
    from train.run import run_recipe

    recipe = recipe_from_dict(
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
                "projector": {"name": "tokenpacker", "scale": 2, "hd_grids": [[1, 1], [2, 2]]},
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
    metrics = run_recipe(recipe)
    assert metrics["visual_tokens"] == 16 + 8 * 9  # thumbnail + 2×2 crops as 8 lines of 8 + newline
    assert metrics["count"] == 4 * 6


def test_region_objective_refuses_hd():
    from train.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="stages\\[0\\].objective"):
        recipe_from_dict(
            {
                "description": "x",
                "output": "o",
                "model": {"projector": {"name": "tokenpacker", "hd_grids": [[2, 2]]}},
                "stages": [{"name": "v", "objective": "region", "steps": 1, "train": {"vision": "full"}}],
            }
        )
