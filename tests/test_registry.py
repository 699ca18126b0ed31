"""One contract test over every registered component, plus registry errors."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tests.components  # noqa: F401  (registers the hook-point test components)
from models.build import ComponentSpec, build
from models.compressors import available, component_class
from models.compressors.base import Progress
from tests.conftest import TEST_TINY

# Parameters that make each component compress on the test model (8×8 patch grid).
PARAMS = {
    "avgpool2d": {"stride": 2},
    "downsample": {"side": 4},
    "random": {"tokens": 10},
    "divprune": {"tokens": 10},
    "fastv": {"layer": 0, "tokens": 10},
    "pdrop": {"layers": [1], "keep": 0.5},
    "visionzip": {"tokens": 12},
    "llavolta": {"inference": {"layer": 1, "stride": 4}},
    "covipal": {"guidance_layer": 1},
    "dyvte": {"hidden": 16},
    "falcon": {"registers": 8},
    "test_scheduled_keep": {"start": 16, "end": 6},
}
# Components that do not compress: the visual tokens they leave beyond the patches (every other
# component must leave fewer tokens than patches).
NOT_COMPRESSING = {
    "mlp2x_gelu": 0,
    "test_attention_gain": 0,
    "test_alternating_gates": 0,
    "test_view_registers": 1,
}
DYNAMIC = {"dyvte"}  # decides per sample whether to drop its visual tokens


def model_with(name):
    cls = component_class(name)
    spec = ComponentSpec(name, PARAMS.get(name, {}))
    if cls.stage == "projector":
        return build("tiny", projector=spec, tiny=TEST_TINY, seed=1).model
    return build("tiny", compressors=[spec], tiny=TEST_TINY, seed=1).model


def ragged_batch(model, tok):
    rows = [
        [tok.bos_token_id, model.image_token_id, 10, 11, 12, 13],
        [tok.bos_token_id, model.image_token_id, 10],
    ]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return ids, mask


@pytest.mark.parametrize("name", available())
def test_component_contract(name, tokenizer):
    model = model_with(name)
    component = model.projector if component_class(name).stage == "projector" else model.compressors[0]
    # The parameters must be valid on the test model, or a component could pass by never acting.
    assert component_class(name).check_config(component.config, model.dims) == []
    ids, mask = ragged_batch(model, tokenizer)
    pixels = torch.randn(2, 3, 64, 64)
    labels = ids.masked_fill(~mask, -100)
    expected = model.visual_tokens()
    patches = model.vision.num_patches
    if component.stage in ("pixels", "projector", "encoder", "pre_llm"):
        assert expected == component.output_tokens(patches)

    # Only the component trains: freeze everything else.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in component.parameters():
        p.requires_grad_(True)
    for batch in (slice(0, 1), slice(0, 2)):  # batch 1 and ragged batch 2
        args = ids[batch], mask[batch], pixels[batch], labels[batch]
        # Inference behaviour: what the last layer attends to has fewer visual tokens than there
        # are patches, unless the component does not compress (a dynamic one: at most as many).
        out = model.eval()(*args, return_logits=True)
        assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
        if component.stage in ("pixels", "projector", "pre_llm", "encoder"):
            assert out.visual_tokens_in.tolist() == [expected] * (batch.stop - batch.start)
        final = out.state
        visible = final.visual_mask & (final.attention_mask if final.key_mask is None else final.key_mask)
        left = visible.sum(1).tolist()
        if name in NOT_COMPRESSING:
            assert all(n == patches + NOT_COMPRESSING[name] for n in left), left
        elif name in DYNAMIC:
            assert all(n <= patches for n in left), left
        else:
            assert all(n < patches for n in left), left
        # Training behaviour, in a stage that minimises the LM loss and every loss it declares.
        model.train().set_progress(Progress(0, 10, ("lm", *component.aux_losses)))
        out = model(*args, return_logits=True)
        model.set_progress(None)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
        assert set(out.aux_losses) == set(component.aux_losses)
        assert all(torch.isfinite(v) and v.dim() == 0 for v in out.aux_losses.values())
    trainable = list(component.parameters())
    if trainable:  # parameter-free components (pooling, pruning baselines) have nothing to train
        (out.loss + sum(out.aux_losses.values())).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        with torch.no_grad():  # move the weights away from a fresh instance's
            for p in trainable:
                p.add_(torch.randn_like(p) * 0.1)
    else:
        assert not out.loss.requires_grad

    # The state dict carries everything: loaded into a fresh model, the same outputs.
    model.eval()
    fresh = model_with(name).eval()
    fresh_component = fresh.projector if component.stage == "projector" else fresh.compressors[0]
    with torch.no_grad():
        reference = model(ids, mask, pixels, return_logits=True).logits
        if trainable:  # the test can fail: before loading, the outputs differ
            before = fresh(ids, mask, pixels, return_logits=True).logits  # a dynamic method: other lengths

            def differ() -> bool:
                return before.shape != reference.shape or not torch.allclose(before, reference)

            # A decision method's (DyVTE's) logits move only when a decision flips, which a small
            # nudge need not do: nudge the trained copy further until one does.
            for _ in range(5):
                if differ():
                    break
                for p in trainable:
                    p.add_(torch.randn_like(p))
                reference = model(ids, mask, pixels, return_logits=True).logits
            assert differ()
        fresh_component.load_state_dict(component.state_dict())
        assert torch.equal(fresh(ids, mask, pixels, return_logits=True).logits, reference)

    # What it counted over those forwards survives a stopped evaluation row (saved as JSON with
    # the row's answers, loaded into the model that goes on): no shipped row starts over.
    state = component.statistics_state()
    assert state is not None, f"{name} counts (`statistics`) but cannot save its counts"
    fresh_component.reset_statistics()
    fresh_component.load_statistics_state(json.loads(json.dumps(state)))
    assert fresh_component.statistics() == component.statistics()


@pytest.mark.parametrize("name", available())
def test_generate_counts_the_visual_tokens_each_layer_holds(name, tokenizer):
    """`generate`'s per-layer visual-token count (what `vtc evaluate`'s layer mean and FLOPs are
    made of) is, for each sample of a ragged batch, the sequence entering each decoder layer of
    its own prefill less its text: what its layers computed, as if it were alone."""
    model = model_with(name).eval()
    ids, mask = ragged_batch(model, tokenizer)
    pixels = torch.randn(2, 3, 64, 64)
    layers = model.llm.body.layers
    with torch.no_grad():
        _, visual_in, visual_layers = model.generate(ids, mask, pixels, max_new_tokens=2)
    assert visual_layers.shape == (2, len(layers))
    for b in range(2):
        real = mask[b]
        lengths = []

        def length(_module, args, kwargs, lengths=lengths):
            lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

        hooks = [layer.register_forward_pre_hook(length, with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad():
                model.generate(
                    ids[b : b + 1, real], mask[b : b + 1, real], pixels[b : b + 1], max_new_tokens=1
                )
        finally:
            for hook in hooks:
                hook.remove()
        text = int(real.sum()) - 1  # all but the <image> placeholder
        assert visual_layers[b].tolist() == [n - text for n in lengths[: len(layers)]]
        assert int(visual_layers[b].max()) <= int(visual_in[b])


@pytest.mark.parametrize("name", available())
def test_component_config_is_a_frozen_dataclass(name):
    config_cls = component_class(name).Config
    assert dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen
    assert component_class(name).__doc__, f"{name} needs a docstring"


def test_unknown_component_names_nearest():
    with pytest.raises(KeyError, match="did you mean 'avgpool2d'"):
        component_class("avgpool")


def test_double_registration_is_refused():
    from models.compressors import register
    from models.compressors.mlp import MlpProjector

    with pytest.raises(ValueError, match="registered twice"):
        register("mlp2x_gelu")(MlpProjector)


def test_readme_lists_every_shipped_component_with_its_stage():
    """The README's "Registered now" table is the user's list of components: every shipped one
    (the test-only `test_*` components aside) is a row, with the stage it really runs at."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("Registered now:", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    documented = {name.strip().strip("`"): stage.strip() for name, stage in rows}
    shipped = {n: component_class(n).stage for n in available() if not n.startswith("test_")}
    assert documented == shipped
