"""TokenPacker: region locality, float32 interpolation, the 7B build on the meta device."""

import pytest
import torch

from models.build import ComponentSpec, build, dims_of
from models.compressors import build_component
from models.compressors.base import ModelDims, VisionFeatures
from models.compressors.tokenpacker import default_taps
from train.recipe import REPO_ROOT, RecipeError, load_recipe, recipe_from_dict

DIMS = ModelDims(
    vision_width=32, vision_layers=6, vision_heads=2, grid=6, llm_width=48, llm_layers=2, llm_heads=2
)
LLAVA_7B = str(REPO_ROOT / "models" / "configs" / "llava-1.5-7b-hf")


def features(batch=2, dims=DIMS, layers=None):
    g = dims.grid
    hidden = tuple(
        torch.randn(batch, 1 + g * g, dims.vision_width) for _ in range((layers or dims.vision_layers) + 1)
    )
    return VisionFeatures(hidden[-2][:, 1:], hidden, g)


def test_default_taps_follow_the_reference_depths():
    assert default_taps(24) == (12, 16, 22, 23)
    assert default_taps(6) == (3, 5)  # 12 and 16 of 24 both land on layer 3 of 6: kept once
    assert max(default_taps(4)) == 3  # never past LLaVA's feature layer (-2)


@pytest.mark.parametrize("scale,tokens", [(1, 36), (2, 9), (3, 4)])
def test_token_count_and_shape(scale, tokens):
    packer = build_component("tokenpacker", {"scale": scale}, DIMS).eval()
    out = packer(features())
    assert out.shape == (2, tokens, DIMS.llm_width) and packer.output_tokens(36) == tokens


@pytest.mark.parametrize("scale", [2, 3])
def test_each_query_sees_only_its_region(scale):
    """Perturbing one patch changes exactly the token of the region holding it. (The point query
    is bilinear over the whole map, so perturb only the multi-level taps, not the query layer.)"""
    packer = build_component("tokenpacker", {"scale": scale}, DIMS).eval()
    feats = features(batch=1)
    with torch.no_grad():
        base = packer(feats)
        g, r = DIMS.grid, DIMS.grid // scale
        row, col = 4, 1  # a patch in region (4 // s, 1 // s)
        hidden = list(feats.hidden_states)
        for t in packer.taps:
            hidden[t] = hidden[t].clone()
            hidden[t][0, 1 + row * g + col] += 5.0
        moved = packer(VisionFeatures(feats.selected, tuple(hidden), g))
    changed = (moved - base).abs().amax(-1)[0] > 1e-6
    region = (row // scale) * r + col // scale
    assert changed.tolist() == [i == region for i in range(r * r)]


def test_query_interpolation_is_float32_under_bf16_autocast():
    packer = build_component("tokenpacker", {"scale": 2}, DIMS)
    seen = []
    hook = torch.nn.functional.interpolate

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return hook(x, *args, **kwargs)

    torch.nn.functional.interpolate = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = packer(features())
    finally:
        torch.nn.functional.interpolate = hook
    assert seen == [torch.float32] and out.dtype == torch.bfloat16


def test_scale_must_divide_the_grid_named_in_recipe():
    raw = {
        "description": "x",
        "output": "o",
        "stages": [{"name": "s", "steps": 1}],
        "model": {"projector": {"name": "tokenpacker", "scale": 3}},
    }
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "tp.yaml")  # tiny tower: 8×8 grid
    assert [p.key for p in info.value.problems] == ["model.projector.scale"]
    assert "divisors: [1, 2, 4, 8]" in info.value.problems[0].message


def test_llava_7b_build_on_meta_device():
    """Real LLaVA-1.5-7B shapes, no weights: TokenPacker ≈ 36.7 M parameters at s = 2 vs the MLP
    projector's ≈ 21.0 M, and 144 / 64 / 36 tokens for s = 2 / 3 / 4 at 336 px."""
    mlp = build(LLAVA_7B, device="meta").model
    assert mlp.visual_tokens() == 576
    assert abs(sum(p.numel() for p in mlp.projector.parameters()) / 1e6 - 21.0) < 0.1
    for scale, tokens in ((2, 144), (3, 64), (4, 36)):
        model = build(LLAVA_7B, projector=ComponentSpec("tokenpacker", {"scale": scale}), device="meta").model
        assert model.visual_tokens() == tokens
        assert model.projector.taps == (12, 16, 22, 23)
        if scale == 2:
            assert abs(sum(p.numel() for p in model.projector.parameters()) / 1e6 - 36.7) < 0.1
    dims = dims_of(mlp_config := build(LLAVA_7B, device="meta").hf.config)
    assert (dims.grid, dims.vision_width, dims.llm_width, mlp_config.image_token_index) == (
        24,
        1024,
        4096,
        32000,
    )


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_7b_recipes_validate_anywhere_and_need_cuda_here(stage):
    recipe = load_recipe(f"llava-1.5-7b/tokenpacker/{stage}", check_machine=False)
    assert recipe.trainer.strategy == "deepspeed_stage_2" and recipe.model.projector.name == "tokenpacker"
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="trainer.strategy"):
            load_recipe(f"llava-1.5-7b/tokenpacker/{stage}")


def test_warm_start_begins_as_pooling_through_the_bases_projector_and_then_learns():
    """With warm_start, TokenPacker at step 0 is MLP_base(2×2 mean of the features), and its
    attention gets a gradient through the zero-initialised out-projection."""
    import torch.nn.functional as F

    from tests.conftest import TEST_TINY

    base = build("tiny", tiny=TEST_TINY, seed=3)  # its MLP projector plays the trained one
    from models.build import assemble

    warm = assemble(base.hf, ComponentSpec("tokenpacker", {"scale": 2, "warm_start": True})).eval()
    cold = assemble(base.hf, ComponentSpec("tokenpacker", {"scale": 2})).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = base.model.vision(pixels).selected  # (2, 64, Dv)
        g = base.model.vision.grid
        pooled = F.avg_pool2d(feats.view(2, g, g, -1).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
        expected = base.model.projector.linear_2(
            base.model.projector.act(base.model.projector.linear_1(pooled))
        )
        torch.testing.assert_close(warm.encode_images(pixels), expected)
        assert not torch.allclose(cold.encode_images(pixels), expected)
    warm.encode_images(pixels).sum().backward()
    assert warm.projector.attention.out_proj.weight.grad.abs().sum() > 0
    # a width other than the vision width cannot add the point query back: a recipe error
    problems = warm.projector.check_config(
        warm.projector.Config(scale=2, width=16, heads=2, warm_start=True), warm.dims
    )
    assert [key for key, _ in problems] == ["warm_start"]
