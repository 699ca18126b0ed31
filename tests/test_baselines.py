"""Training-free pre-LLM baselines keep exactly the requested tokens, for any batch and padding."""

import pytest
import torch

from models.compressors import build_component
from models.compressors.base import ModelDims
from models.compressors.divprune import select_diverse
from models.sequence import SequenceState

DIMS = ModelDims(
    vision_width=8, vision_layers=2, vision_heads=2, grid=4, llm_width=8, llm_layers=2, llm_heads=2
)


def ragged_state(side: str) -> SequenceState:
    """Sample 0: 2 text + 16 visual + 3 text; sample 1: 1 text + 16 visual, padded on `side`."""
    hidden = torch.randn(2, 21, 8)
    visual = torch.zeros(2, 21, dtype=torch.bool)
    mask = torch.ones(2, 21, dtype=torch.bool)
    visual[0, 2:18] = True
    offset = 4 if side == "left" else 0
    visual[1, offset + 1 : offset + 17] = True
    mask[1] = False
    mask[1, offset : offset + 17] = True
    positions = (torch.arange(21) - torch.tensor([[0], [offset]])).clamp(min=0)
    return SequenceState(hidden, mask, positions, visual, padding_side=side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["random", "divprune"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
def test_keeps_exactly_the_requested_tokens(name, tokens, side):
    state = ragged_state(side)
    out = build_component(name, {"tokens": tokens}, DIMS)(state)
    assert out.num_visual.tolist() == [min(tokens, 16)] * 2
    assert (out.attention_mask.sum(1) - out.num_visual).tolist() == [5, 1]  # text untouched
    kept = out.position_ids[0][out.visual_mask[0]]
    assert kept.tolist() == sorted(kept.tolist())  # original order preserved
    if side == "left":  # every prompt still ends at the last column
        assert out.attention_mask[:, -1].all()


def test_random_keep_is_reproducible_and_seed_dependent():
    state = ragged_state("right")
    a = build_component("random", {"tokens": 5, "seed": 1}, DIMS)(state)
    b = build_component("random", {"tokens": 5, "seed": 1}, DIMS)(state)
    c = build_component("random", {"tokens": 5, "seed": 2}, DIMS)(state)
    assert torch.equal(a.position_ids, b.position_ids) and not torch.equal(a.position_ids, c.position_ids)


def test_divprune_prefers_distinct_directions_over_duplicates():
    directions = torch.eye(4)
    tokens = torch.cat([directions[0].expand(5, 4), directions[1:]])  # 5 copies of e0, then e1, e2, e3
    chosen = select_diverse(tokens, 4).tolist()
    assert sum(i < 5 for i in chosen) == 1 and {5, 6, 7} <= set(chosen)


def test_visionzip_keeps_the_cls_dominant_patches_plus_merged_context():
    from models.build import build
    from tests.conftest import TEST_TINY

    built = build("tiny", compressors=[], tiny=TEST_TINY, seed=0)
    pixels = torch.randn(3, 3, 64, 64)
    tower = built.model.vision
    hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    attention, keys = tower.cls_attention(hidden)
    # the recomputed CLS attention is the tower's own (eager attention, layer -2 = layer index 0)
    tower.model.config._attn_implementation = "eager"
    eager = tower.model(pixel_values=pixels, output_attentions=True).attentions[-2]
    torch.testing.assert_close(attention, eager.mean(1)[:, 0, 1:])
    patches = hidden[-2][:, 1:]
    for tokens in (1, 5, 16, 63):
        zipper = build_component("visionzip", {"tokens": tokens}, built.model.dims)
        out = zipper.select(hidden, 64, cls_attention=attention, keys=keys)
        assert out.shape == (3, min(tokens, 64), patches.shape[-1])
        dominant, contextual = zipper.split(64)
        assert dominant + contextual == min(tokens, 64)
        top = attention.topk(dominant, dim=1).indices.sort(1).values
        expected = patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))
        assert torch.equal(out[:, :dominant], expected)
    assert torch.equal(
        build_component("visionzip", {"tokens": 64}, built.model.dims).select(
            hidden, 64, cls_attention=attention, keys=keys
        ),
        patches,
    )
    assert build_component("visionzip", {"tokens": 16}, built.model.dims).split(64) == (14, 2)


def test_downsample_feeds_the_tower_a_smaller_image():
    """The tower sees the image resized to side·patch pixels, with its position embeddings
    interpolated (as HF's own `interpolate_pos_encoding`), and costs the FLOPs of that size."""
    import torch.nn.functional as F

    from models.build import ComponentSpec, build
    from models.flops import prefill_flops
    from tests.conftest import TEST_TINY

    pixels = torch.randn(2, 3, 64, 64)
    base = build("tiny", tiny=TEST_TINY, seed=1).model.eval()
    small = build("tiny", compressors=[ComponentSpec("downsample", {"side": 4})], tiny=TEST_TINY, seed=1)
    model = small.model.eval()
    assert model.visual_tokens() == 16 and model.vision_patches() == 16
    with torch.no_grad():
        tokens = model.encode_images(pixels)
        resized = F.interpolate(pixels, size=(32, 32), mode="bilinear", antialias=True)
        hf = model.vision.model(
            pixel_values=resized, output_hidden_states=True, interpolate_pos_encoding=True
        )
        expected = model.projector(model.vision(resized))
        assert tokens.shape == (2, 16, TEST_TINY.llm_width)
        assert torch.allclose(tokens, expected)
        assert torch.allclose(model.vision(resized).selected, hf.hidden_states[-2][:, 1:])
        # the whole grid: nothing changes
        same = build("tiny", compressors=[ComponentSpec("downsample", {"side": 8})], tiny=TEST_TINY, seed=1)
        assert torch.equal(same.model.eval().encode_images(pixels), base.encode_images(pixels))
    config = small.hf.config
    full = prefill_flops(config, 10, 64).vision
    assert prefill_flops(config, 10, 16, vision_patches=16).vision < full / 3
