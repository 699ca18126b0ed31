"""The analytic prefill FLOPs counter on the real LLaVA-1.5-7B configuration (meta device)."""

import pytest
import torch
from transformers import LlavaConfig

from models.build import build
from models.compressors.base import VisionFeatures
from models.flops import llm_flops, module_flops, prefill_flops
from train.recipe import REPO_ROOT

LLAVA_7B = REPO_ROOT / "models" / "configs" / "llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def config():
    return LlavaConfig.from_pretrained(LLAVA_7B)


def meta_features(grid=24, width=1024, layers=24):
    hidden = tuple(torch.empty(1, 1 + grid * grid, width, device="meta") for _ in range(layers + 1))
    return VisionFeatures(torch.empty(1, grid * grid, width, device="meta"), hidden, grid)


def test_llava_7b_prefill_matches_published_figures(config):
    projector = build(str(LLAVA_7B), device="meta").model.projector
    proj = module_flops(projector, meta_features())
    assert proj == pytest.approx(2 * 576 * (1024 * 4096 + 4096 * 4096))  # exactly the MLP's multiply-adds
    flops = prefill_flops(config, text_tokens=60, visual_tokens=576, projector_flops=proj)
    assert flops.total / 1e12 == pytest.approx(8.9, abs=0.1)
    assert (flops.vision + flops.projector) / flops.total == pytest.approx(0.046, abs=0.002)
    assert prefill_flops(config, 60, 64).llm / 1e12 == pytest.approx(1.6, abs=0.05)


def test_per_layer_tokens_count_in_llm_shortening(config):
    layers = config.text_config.num_hidden_layers
    full = llm_flops(config.text_config, [636] * layers)
    shortened = llm_flops(
        config.text_config, [636] * 2 + [60] * (layers - 2)
    )  # drop 576 visual tokens after layer 2
    assert shortened < full / 4
    one_layer = llm_flops(config.text_config, [636] + [0] * (layers - 1)) - llm_flops(
        config.text_config, [0] * layers
    )
    assert full - llm_flops(config.text_config, [0] * layers) == pytest.approx(layers * one_layer)
    with pytest.raises(ValueError, match="layer_tokens"):
        prefill_flops(config, 60, 576, layer_tokens=[1, 2])


@pytest.mark.parametrize("vision_type", ["clip", "siglip"])
def test_the_counted_tower_equals_the_analytic_count(vision_type):
    """`vtc evaluate` counts the tower it runs (attention on CPU included); on a plain tower that
    is the analytic figure per view. SigLIP's pooling head, which HF's forward would compute
    although LLaVA reads a hidden state, is skipped (its weights stay)."""
    import dataclasses

    from models.flops import vision_flops
    from tests.conftest import TEST_TINY

    built = build("tiny", tiny=dataclasses.replace(TEST_TINY, vision_type=vision_type))
    config = built.hf.config.vision_config
    pixels = torch.randn(3, 3, config.image_size, config.image_size)
    hf_tower = built.model.vision.model
    head = getattr(getattr(hf_tower, "vision_model", hf_tower), "head", None)
    assert (head is not None) == (vision_type == "siglip")  # loaded, and saved with the model
    assert module_flops(built.model.eval().vision_features, pixels) == 3 * vision_flops(config)
