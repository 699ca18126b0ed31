"""Components acting inside the vision encoder's layers (CLIP and SigLIP), per call, and reading
the host once assembled."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import tests.components  # noqa: F401  (registers test_attention_gain)
from models.build import ComponentSpec, build
from models.vision import VisionTower
from tests.conftest import TEST_TINY

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TOWERS = {
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**SMALL)),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**SMALL)),
}


def gain_component(layers, width):
    from models.compressors import build_component
    from models.compressors.base import ModelDims

    return build_component("test_attention_gain", {}, ModelDims(width, layers, 2, 4, 64, 2, 2))


@pytest.mark.parametrize("kind", list(TOWERS))
def test_a_layer_hook_acts_on_this_call_of_this_model_only(kind):
    torch.manual_seed(0)
    hf = TOWERS[kind]().eval()
    twin = TOWERS[kind]().eval()
    twin.load_state_dict(hf.state_dict())  # a second model of the same class in the process
    tower = VisionTower(hf, feature_layer=-1, select_strategy="full" if kind == "siglip" else "default")
    gain = gain_component(3, 32)
    pixels = torch.randn(2, 3, 32, 32)
    plain = tower(pixels).selected
    torch.testing.assert_close(tower(pixels, in_layers=[gain]).selected, plain)  # gain 1: unchanged
    with torch.no_grad():
        gain.gain[1] = 0.0  # layer 1 drops its attention output
    hooked = tower(pixels, in_layers=[gain])
    assert not torch.allclose(hooked.selected, plain)
    # hidden_states[i] is layer i-1's output: layer 0 is untouched, layer 1 on differ
    reference = tower(pixels).hidden_states
    torch.testing.assert_close(hooked.hidden_states[1], reference[1])
    assert not torch.allclose(hooked.hidden_states[2], reference[2])
    # the hook was for that call: the tower and its twin run as before
    torch.testing.assert_close(tower(pixels).selected, plain)
    with torch.no_grad():
        twin_out = twin(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(twin_out, reference[-1])
    # gradients reach the gains of the layers the output depends on
    tower(pixels, in_layers=[gain]).selected.sum().backward()
    assert gain.gain.grad[:2].abs().sum() > 0


def test_attach_reads_the_host_and_training_reaches_the_gains(tokenizer):
    model = build("tiny", compressors=[ComponentSpec("test_attention_gain")], tiny=TEST_TINY, seed=0).model
    component = model.compressors[0]
    source = model.vision.layers()[0].self_attn.q_proj
    assert torch.equal(component.query.weight, source.weight) and torch.equal(
        component.query.bias, source.bias
    )
    ids = torch.tensor([[tokenizer.bos_token_id, model.image_token_id, 10, 11]])
    out = model(ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(1, 3, 64, 64), ids.clone())
    out.loss.backward()
    assert component.gain.grad is not None and component.gain.grad.abs().sum() > 0


def test_where_the_patches_sit_is_recorded_once():
    """CLIP puts a CLS token before the patches, SigLIP none: the dims, the tower's selection,
    TokenPacker's taps, VisionZip's check and the FLOPs counter all read it from one place."""
    from models.build import dims_of
    from models.compressors import component_class
    from models.flops import vision_flops
    from models.tiny import tiny_llava_config, tiny_tokenizer

    config = tiny_llava_config(TEST_TINY, tiny_tokenizer())
    assert dims_of(config).prefix_tokens == 1
    siglip = SiglipVisionConfig(**SMALL)
    config.vision_config = siglip
    dims = dims_of(config)
    assert dims.prefix_tokens == 0
    visionzip = component_class("visionzip")
    assert [k for k, _ in visionzip.check_config(visionzip.Config(tokens=4), dims)] == ["tokens"]
    tower = VisionTower(TOWERS["siglip"]().eval(), feature_layer=-1, select_strategy="default")
    features = tower(torch.randn(1, 3, 32, 32))
    assert features.selected.shape[1] == 16 and features.prefix_tokens == 0  # nothing dropped
    torch.testing.assert_close(features.patches(-1, 16), features.selected)
    clip = CLIPVisionConfig(**SMALL)
    assert vision_flops(clip) > vision_flops(siglip)  # one token more per layer
    # appended tokens (registers) run every layer but, unlike patches, are not patch-embedded
    patches = (clip.image_size // clip.patch_size) ** 2
    assert vision_flops(clip) < vision_flops(clip, extra_tokens=4) < vision_flops(clip, patches + 4)
    # a last layer that computes 4 rows only skips, for every other row, its query and output
    # projections, its attention row and its MLP: 2 FLOPs per multiply-add
    n, d, ff = patches + 1 + 4, clip.hidden_size, clip.intermediate_size
    skipped = 2.0 * (n - 4) * (2 * d * d + 2 * n * d + 2 * d * ff)
    assert (
        vision_flops(clip, extra_tokens=4, last_layer_rows=4) == vision_flops(clip, extra_tokens=4) - skipped
    )
