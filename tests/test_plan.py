"""`vtc plan`: model-state memory against DeepSpeed's own estimators, the activation formula
against what autograd really keeps on the tiny model, steps per epoch, and the CLI."""

import os

import pytest
import torch

from models.build import build
from tests.conftest import TEST_TINY
from train.plan import (
    GiB,
    activations,
    largest_module,
    model_states,
    parse_memory,
    plan_recipe,
    stage_steps,
    training_flops,
)
from train.recipe import RECIPES_DIR, load_recipe

SEVEN_B = "models/configs/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def deepspeed_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("base", ["tiny", SEVEN_B])
def test_model_states_agree_with_deepspeed(deepspeed_estimators, base):
    """Every parameter trained, no offload: within 10 % of DeepSpeed's estimate (the same formula)."""
    zero2, zero3 = deepspeed_estimators
    model = build(base, device="meta", dtype=torch.bfloat16).model
    total = sum(p.numel() for p in model.parameters())
    largest = largest_module(model)
    for gpus, nodes in ((8, 1), (8, 2)):
        world = gpus * nodes
        _, expected2 = zero2(total, gpus, nodes, cpu_offload=False)
        _, expected3, _ = zero3(total, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False)
        ours2 = model_states("deepspeed_stage_2", total, total, world, True, largest).total
        ours3 = model_states("deepspeed_stage_3", total, total, world, True, largest).total
        assert abs(ours2 - expected2) <= 0.1 * expected2
        assert abs(ours3 - expected3) <= 0.1 * expected3


def test_frozen_parameters_hold_only_their_weights():
    world, total, trainable = 8, 7_000_000_000, 20_000_000
    zero2 = model_states("deepspeed_stage_2", total, trainable, world, True, 10)
    assert zero2.weights == 2 * total and zero2.gradients == 2 * trainable / world
    assert zero2.optimizer == 16 * trainable / world
    zero3 = model_states("deepspeed_stage_3", total, trainable, world, True, 10)
    assert zero3.weights == pytest.approx(2 * total / world + 2 * 10)
    single = model_states("auto", 100, 40, 1, False, 10)
    assert (single.weights, single.gradients, single.optimizer) == (400, 160, 320)
    # bfloat16 weights under bf16-mixed, DDP: float32 master copies, their gradients, Adam's
    mixed = model_states("ddp", 100, 40, 1, True, 10, dtype_bytes=2, mixed=True)
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (2 * 100 + 4 * 40, 6 * 40, 8 * 40)
    true = model_states("ddp", 100, 40, 1, True, 10, dtype_bytes=2, mixed=False)  # bf16-true
    assert (true.weights, true.gradients, true.optimizer) == (200, 80, 160)


def saved_bytes(model, batch, checkpoint_llm=False) -> int:
    """Bytes autograd keeps for backward in one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.set_gradient_checkpointing(llm=checkpoint_llm, vision=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*batch)
    return sum(seen.values())


@pytest.fixture(scope="module")
def tiny_batch():
    built = build("tiny", tiny=TEST_TINY, seed=0)
    model, tokenizer = built.model.train(), built.tokenizer
    batch, length = 4, 160
    ids = torch.randint(10, 100, (batch, length - model.visual_tokens() + 1))
    ids[:, 0], ids[:, 1] = tokenizer.bos_token_id, model.image_token_id
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    pixels = torch.randn(batch, 3, 64, 64)
    return built, (ids, torch.ones_like(ids, dtype=torch.bool), pixels, labels), length


@pytest.mark.parametrize("train_vision", [False, True])
def test_activation_formula_matches_what_autograd_keeps(tiny_batch, train_vision):
    """Within 25 % of the bytes a real forward of the tiny model saves for backward."""
    built, batch, length = tiny_batch
    model = built.model
    for p in model.vision.parameters():
        p.requires_grad_(train_vision)
    measured = saved_bytes(model, batch)
    estimate = activations(
        built.hf.config, 4, length, 1, 4, train_vision, True, checkpoint_llm=False, checkpoint_vision=False
    ).total
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def test_checkpointed_llm_keeps_its_layer_inputs(tiny_batch):
    """With LLM checkpointing the forward keeps each layer's input: the formula's first term."""
    built, batch, length = tiny_batch
    model = built.model
    for p in model.vision.parameters():
        p.requires_grad_(False)
    plain, checkpointed = saved_bytes(model, batch), saved_bytes(model, batch, checkpoint_llm=True)
    config = built.hf.config
    full = activations(config, 4, length, 1, 4, False, True, checkpoint_llm=False, checkpoint_vision=False)
    kept = activations(config, 4, length, 1, 4, False, True, checkpoint_llm=True, checkpoint_vision=False)
    one_layer = (full.llm - 4 * length**2 * 4) / config.text_config.num_hidden_layers
    assert checkpointed < plain / 2
    assert abs((kept.total - one_layer) - checkpointed) <= 0.25 * checkpointed


def test_a_frozen_llm_forward_is_counted_where_nothing_is_kept():
    """A DyVTE router stage (`aux`, LLM frozen) keeps no LLM activation for backward, but its
    forward computes every layer's intermediates, one layer at a time, and its exit labels
    score the answers through the LM head: the plan's bytes bound the peak of the tensors a real
    training step of the tiny model makes (forward and backward; on CPU, whose attention also
    materialises the S×S scores the GPU's fused kernel does not), within 2×. Until 2026-12-07
    the plan counted 0 bytes for it."""
    from models.build import ComponentSpec
    from models.compressors.base import Progress
    from train.evaluation.measure import LiveTensorBytes

    built = build("tiny", tiny=TEST_TINY, seed=0, compressors=[ComponentSpec("dyvte", {"hidden": 16})])
    model, tokenizer = built.model.train(), built.tokenizer
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("compressors."))
    model.set_progress(Progress(0, 10, ("router_ce",)))
    torch.manual_seed(0)
    for length in (160, 320):
        ids = torch.randint(10, 100, (4, length - model.visual_tokens() + 1))
        ids[:, 0], ids[:, 1] = tokenizer.bos_token_id, model.image_token_id
        labels = ids.clone()
        labels[:, : ids.shape[1] // 2] = -100
        with LiveTensorBytes() as made:
            out = model(
                ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(4, 3, 64, 64), labels, lm_loss=False
            )
            out.aux_losses["router_ce"].backward()
        estimate = activations(
            built.hf.config, 4, length, 1, 4, False, False, False, False, lm_loss=False, scores_answers=True
        )
        assert estimate.llm == 0 and estimate.forward > 0 and estimate.loss > 0
        assert made.peak <= estimate.total <= 2 * made.peak, (length, made.peak, estimate)


@pytest.mark.parametrize(
    "name, scores, forward",
    [
        ("llava-1.5-7b/dyvte/routers", True, True),  # exit labels: the answers scored
        ("llava-1.5-7b/covipal/scorer", False, True),  # the guidance layer's attention only
        ("llava-1.5-7b/tokenpacker/finetune", True, False),  # the LLM's own kept for backward
    ],
)
def test_the_plan_counts_the_forward_and_scores_of_each_stage(name, scores, forward):
    (plan,) = plan_recipe(load_recipe(name, check_machine=False), samples=665_298)
    assert (plan.activations.loss > 0) == scores and (plan.activations.forward > 0) == forward


def test_steps_per_epoch_of_the_published_data():
    """558K captions at 256 and 665K instructions at 128 per step: vtc drops the last partial
    batch, the HF Trainer LLaVA used takes it (2,181 and 5,198 steps)."""
    pretrain = load_recipe("llava-1.5-7b/tokenpacker/pretrain", check_machine=False).stages[0]
    finetune = load_recipe("llava-1.5-7b/tokenpacker/finetune", check_machine=False).stages[0]
    steps, note = stage_steps(pretrain, 558_128, 8, 1)
    assert steps == 2180 and "2,181" in note
    steps, note = stage_steps(finetune, 665_298, 8, 1)
    assert steps == 5197 and "5,198" in note
    assert stage_steps(finetune, None, 8, 1)[0] is None


def test_training_flops_count_the_backward_that_runs():
    class Prefill:
        vision, projector, llm = 10.0, 1.0, 100.0

    projector_only = {"vision": False, "projector": True, "llm": False}
    # vision forward; projector forward + weight grads; LLM forward + input grads (to reach the projector)
    assert training_flops(Prefill, projector_only, {}) == 10 + 2 + 200
    everything = {"vision": True, "projector": True, "llm": True}
    assert training_flops(Prefill, everything, {}) == 20 + 3 + 300
    assert training_flops(Prefill, everything, {"llm": True}) == 20 + 3 + 400


GPU_RECIPES = sorted(
    str(path.relative_to(RECIPES_DIR).with_suffix(""))
    for path in RECIPES_DIR.rglob("*.yaml")
    if "tiny" not in path.parts
)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_shipped_gpu_recipes_fit_8_gpus_of_80gb(name):
    """With the published batch sizes (gradient checkpointing where the recipe needs it)."""
    recipe = load_recipe(name, check_machine=False)
    for plan in plan_recipe(recipe, samples=665_298):
        assert plan.memory < 80 * GiB, (name, plan.name, plan.memory / GiB)
        assert plan.world == 8 and plan.steps is not None


def test_plan_cli_warns_when_a_stage_does_not_fit(capsys):
    from train.cli import main

    name = "llava-1.5-7b/tokenpacker/finetune"
    assert main(["plan", name, "--samples", "665298", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "5,197" in out and "fits" in out
    assert main(["plan", name, "trainer.gradient_checkpointing.llm=false", "--gpu-mem", "40GB"]) == 1
    err = capsys.readouterr().err
    assert "stages.0.batch_size" in err and "trainer.gradient_checkpointing.llm=true" in err


def test_memory_sizes():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GiB
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory("lots")


def test_a_down_sampled_tower_costs_less_in_the_plan():
    """A `pixels` component (down-sampling) shrinks what the tower sees: the plan counts the
    smaller image's patches in the vision FLOPs and activations, as the real forward runs it."""
    overrides = ["stages.0.steps=10", "stages.1.steps=10"]
    full = plan_recipe(load_recipe("tiny/smoke", overrides, check_machine=False), samples=256)
    small = plan_recipe(
        load_recipe(
            "tiny/smoke", [*overrides, "model.compressors=[{name: downsample, side: 4}]"], check_machine=False
        ),
        samples=256,
    )
    vision_stage = 0  # trains the tower: its activations are counted
    assert small[vision_stage].activations.vision < full[vision_stage].activations.vision / 3
    for a, b in zip(small, full, strict=True):
        assert a.flops_per_step < b.flops_per_step
