"""`vtc plan`: what a recipe costs before anything runs — per stage, the parameters (total and
trainable, by part), the batch, the steps, the memory each device needs and the training FLOPs
and time. The model is built on the meta device: configs only, no weights, no GPU.

Memory per device is model states + activations, in bytes:

- **Model states** (P parameters in all, T of them trainable, W devices = devices × nodes,
  `half` = 16-bit training, where DeepSpeed keeps fp32 master weights and Adam states):
  - ZeRO-1: 2P (16-bit weights) + 2T (16-bit gradients) + 16T/W (fp32 weights, gradients, Adam
    m and v, partitioned).
  - ZeRO-2: 2P + 18T/W (the 16-bit gradients are partitioned too).
  - ZeRO-3: 4L + (2P + 16T)/W, L the largest single module's parameters (gathered, with its
    gradients, while it runs).
  - DDP / one device: bP + 3bT (weights, gradients, Adam m and v in the model's dtype, b bytes);
    with 16-bit weights under a `-mixed` precision, bP + bT + 16T: the optimizer steps float32
    master copies (4T), their float32 gradients while it steps (4T) and Adam m and v (8T)
    (`train/precision.py`).
  With every parameter trainable, ZeRO-2 and ZeRO-3 are exactly DeepSpeed's
  `estimate_zero{2,3}_model_states_mem_needs` (no offload); frozen parameters hold only their
  weights. In fp32 DeepSpeed keeps no master copy: weights and gradients take 4 bytes each
  (partitioned as above) and the optimizer 8 (Adam m and v).
- **Activations** of one micro-batch of B sequences of S tokens (the recipe's max_length, which
  counts the visual tokens), a bytes per element, what autograd keeps for backward:
  - LLM decoder layer (width h, query width q, key/value width k, MLP width f), per token: two
    RMSNorms, each its input in fp32 (HF computes them in fp32) and its normalised and scaled
    outputs (8h + a·4h); attention's query, key, value and output, and the output's copy that
    o_proj reads (3q + 2k: fused attention keeps no S×S map, only a log-sum-exp per head); the
    SwiGLU MLP's gate, up, activation and product (4f): 8h + a·(4h + 3q + 2k + 4f). With
    gradient checkpointing a layer keeps its input (a·h) and one layer at a time is rebuilt in
    full during backward.
  - the loss: fp32 log-probabilities of every text token (an upper bound: only answers are
    labelled), 4·V per token; the S×S float attention mask, a·S² per sequence, once. The same
    scores where no next-token loss is trained but a trained component scores the answers
    itself (`Compressor.scores_answers`: DyVTE's exit labels).
  - the forward, where the LLM runs but nothing back-propagates through it (a frozen LLM under
    an `aux` stage's routers or scorer): nothing is kept, but one layer at a time computes its
    intermediates, counted as what that layer would keep (an upper bound: the forward frees
    some before the next is made), and the attention mask.
  - vision tower, when it is trained or holds a trained component (FALCON's registers), per patch token
    (of the image the tower sees: after down-sampling) per layer (width d, MLP width e): two
    LayerNorms (4d), query, key, value, output (4d), fc1 output, its activation's two saved
    tensors and fc2's input (3e): a·(8d + 3e); likewise reduced by checkpointing.
  In-LLM compressors (LLaVolta, DyVTE) shorten later layers; the plan counts every layer at full
  length, an upper bound. `tests/test_plan.py` checks the formula against what autograd keeps
  in a real forward of the tiny model.
- **FLOPs** per sample: the analytic prefill count of models/flops.py at S tokens, and for
  training one forward, one backward for the inputs' gradient of every part that a trainable
  part comes before or is, one for the weights' gradient of every trainable part, and one more
  forward of every checkpointed part that is back-propagated through. A trained component
  inside the vision tower counts as training the tower (an upper bound by one tower forward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from models.flops import module_flops, prefill_flops
from models.vision import prefix_tokens
from train.recipe import Recipe, Stage, accumulation, stage_steps_for

GiB = 1024**3
PARTS = ("vision", "projector", "compressors", "llm")
HALF_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true")


@dataclass(frozen=True)
class ModelStates:
    """Bytes per device of the weights, their gradients and the optimizer's states."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(
    strategy: str,
    total: int,
    trainable: int,
    world: int,
    half: bool,
    largest_layer: int,
    dtype_bytes: int = 4,
    mixed: bool = False,
) -> ModelStates:
    """Model-state memory per device (the module docstring gives the formulas); `mixed`: the
    precision is a `-mixed` one."""
    if not strategy.startswith("deepspeed"):
        b = dtype_bytes
        if mixed and b < 4:  # float32 master weights (train/precision.py)
            return ModelStates(b * total + 4 * trainable, (b + 4) * trainable, 8 * trainable)
        return ModelStates(b * total, b * trainable, 2 * b * trainable)
    stage = int(strategy[-1])
    low = 2 if half else 4  # bytes of a weight and of a gradient as the model holds them
    master = 16 if half else 8  # fp32 weights + fp32 gradients + Adam m, v (fp32: Adam only)
    if stage == 3:
        gathered = 2 * low * largest_layer  # one module's full weights and gradients
        return ModelStates(gathered / 2 + low * total / world, gathered / 2, master * trainable / world)
    gradients = low * trainable / (world if stage == 2 else 1)
    return ModelStates(low * total, gradients, master * trainable / world)


def llm_layer_activations(text_config, tokens: int, element_bytes: int) -> float:
    """Bytes one decoder layer keeps for backward over `tokens` tokens (module docstring)."""
    h, f = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    k = (getattr(text_config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    norms = 2 * 4 * h + element_bytes * 2 * 2 * h  # fp32 inputs (HF's RMSNorm), normalised, scaled
    return tokens * (norms + element_bytes * (3 * q + 2 * k + 4 * f))


def vision_layer_activations(vision_config, tokens: int, element_bytes: int) -> float:
    d, e = vision_config.hidden_size, vision_config.intermediate_size
    return element_bytes * tokens * (8 * d + 3 * e)


@dataclass(frozen=True)
class Activations:
    llm: float
    loss: float
    vision: float
    forward: float = 0.0  # one LLM layer's working set, where nothing is kept for backward

    @property
    def total(self) -> float:
        return self.llm + self.loss + self.vision + self.forward


def activations(
    llava_config,
    micro_batch: int,
    sequence: int,
    images: int,
    element_bytes: int,
    trains_vision: bool,
    backprop_llm: bool,
    checkpoint_llm: bool,
    checkpoint_vision: bool,
    lm_loss: bool = True,
    vision_patches: int | None = None,
    runs_llm: bool = True,
    scores_answers: bool = False,
) -> Activations:
    """Activation bytes of one micro-batch: `sequence` tokens per sample in the LLM, `images`
    vision-tower passes per sample (views count), `backprop_llm`: the loss back-propagates
    through the LLM (the LLM is trained, or the LM loss reaches a trained part before it: a
    projector behind a frozen LLM still needs the LLM's activations); `lm_loss`: the stage
    minimises the next-token loss (an `aux` stage only its components' own losses);
    `vision_patches`: patches per view of a tower fed a smaller image (default: its own);
    `runs_llm`: the stage runs the LLM at all (not the tower-only `region` objective);
    `scores_answers`: a trained component scores the answers through the LM head itself."""
    text, vision = llava_config.text_config, llava_config.vision_config
    tokens = micro_batch * sequence
    llm = forward = 0.0
    mask = element_bytes * micro_batch * sequence**2  # the float attention mask, shared
    if backprop_llm:
        layers = text.num_hidden_layers
        full = llm_layer_activations(text, tokens, element_bytes)
        if checkpoint_llm:  # inputs of every layer + one layer rebuilt during backward
            llm = layers * element_bytes * tokens * text.hidden_size + full
        else:
            llm = layers * full
        llm += mask
    elif runs_llm:  # a layer's intermediates at a time, nothing kept
        forward = llm_layer_activations(text, tokens, element_bytes) + mask
    loss = 4.0 * tokens * text.vocab_size if lm_loss or scores_answers else 0.0
    vision_bytes = 0.0
    if trains_vision:
        per_view = vision_patches or (vision.image_size // vision.patch_size) ** 2
        patches = micro_batch * images * (per_view + prefix_tokens(vision))  # + CLIP's class token
        full = vision_layer_activations(vision, patches, element_bytes)
        layers = vision.num_hidden_layers
        if checkpoint_vision:
            vision_bytes = layers * element_bytes * patches * vision.hidden_size + full
        else:
            vision_bytes = layers * full
    return Activations(llm, loss, vision_bytes, forward)


def training_flops(prefill, trainable: dict[str, bool], checkpointed: dict[str, bool]) -> float:
    """FLOPs of one training sample from its prefill FLOPs by part (module docstring).
    `trainable` / `checkpointed`: by part name vision, projector, llm."""
    parts = [("vision", prefill.vision), ("projector", prefill.projector), ("llm", prefill.llm)]
    total, upstream_trained = 0.0, False
    for name, forward in parts:
        total += forward
        if trainable[name]:
            total += forward  # weight gradients
        if upstream_trained:
            total += forward  # input gradients, to reach a trained part before this one
        if (trainable[name] or upstream_trained) and checkpointed.get(name, False):
            total += forward  # the forward rebuilt in backward
        upstream_trained = upstream_trained or trainable[name]
    return total


@dataclass
class StagePlan:
    name: str
    parts: list[tuple[str, str, int, int]]  # (part, mode, trainable, frozen)
    micro_batch: int
    accumulate: int
    world: int
    steps: int | None
    steps_note: str
    states: ModelStates
    activations: Activations
    flops_per_step: float
    plain: Activations  # without gradient checkpointing
    checkpointed: Activations  # with the LLM and the vision tower checkpointed

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulate * self.world

    @property
    def memory(self) -> float:
        return self.states.total + self.activations.total


def largest_module(model: torch.nn.Module) -> int:
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3
    gathers at once, as DeepSpeed's estimators define it."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def stage_steps(stage: Stage, samples: int | None, world: int, accumulate: int) -> tuple[int | None, str]:
    """(optimizer steps, how they were found) of a stage, as training counts them
    (`train.recipe.stage_steps_for`: the last partial batch is dropped)."""
    if stage.steps is not None:
        return stage.steps, "steps"
    if samples is None:
        return None, "unknown: give --samples N (no shard index to count)"
    per_batch = stage.batch_size * world * accumulate
    steps = stage_steps_for(stage, samples, world)
    note = f"{stage.epochs:g} epoch(s) of {samples:,} samples at {per_batch}"
    if samples % per_batch:
        note += (
            f"; the last partial batch is dropped (HF Trainer would take {math.ceil(samples / per_batch):,})"
        )
    return steps, note


def count_samples(recipe: Recipe) -> int | None:
    """Training samples: the synthetic count, or the shard index's length (None if absent)."""
    data = recipe.data
    if data.synthetic is not None:
        return data.synthetic.train
    from data.shards import ShardIndex

    try:
        return len(ShardIndex(data.train_shards))
    except (FileNotFoundError, ValueError, OSError):
        return None


def plan_recipe(recipe: Recipe, samples: int | None = None) -> list[StagePlan]:
    """Build the recipe's model on the meta device and plan each stage in turn (stages change
    what is trainable, and LoRA adapters stay once a stage adds them, as in training)."""
    from models.build import build
    from train.recipe import resolve_base

    spec = recipe.model
    dtype = getattr(torch, spec.dtype)  # float32, bfloat16 or float16
    built = build(
        resolve_base(spec.base),
        spec.projector,
        spec.compressors,
        tiny=spec.tiny,
        device="meta",
        dtype=dtype,
        views=spec.views,
    )
    vision = built.hf.config.vision_config
    pixels = torch.empty(1, 3, vision.image_size, vision.image_size, device="meta", dtype=dtype)
    with torch.no_grad():  # through the `pixels` components (down-sampling) as in a real forward
        features = built.model.vision(built.model.resize_pixels(pixels))
        projector_flops = module_flops(built.model.projector, features)
    samples = samples if samples is not None else count_samples(recipe)
    return [_plan_stage(built, recipe, stage, samples, projector_flops) for stage in recipe.stages]


def _plan_stage(
    built, recipe: Recipe, stage: Stage, samples: int | None, projector_flops: float
) -> StagePlan:
    from train.freeze import apply_stage
    from train.objectives import OBJECTIVES

    model, config, trainer = built.model, built.hf.config, recipe.trainer
    dtype = next(model.parameters()).dtype
    world = trainer.devices * trainer.num_nodes
    half = trainer.precision in HALF_PRECISIONS
    rows = apply_stage(model, stage)
    trained = {part: trainable > 0 for part, _, trainable, _ in rows}
    # a trained component inside the tower (FALCON's registers) back-propagates through it
    trained["vision"] |= any(
        c.stage == "encoder" and any(p.requires_grad for p in c.parameters()) for c in model.components()
    )
    total = sum(t + f for _, _, t, f in rows)
    trainable = sum(t for _, _, t, _ in rows)
    accumulate = accumulation(stage, world)
    steps, note = stage_steps(stage, samples, world, accumulate)
    grids = model.view_grids if stage.views else None
    images = 1 + max(r * c for r, c in grids) if grids else 1
    visual = max(model.visual_tokens(g) for g in grids) if grids else model.visual_tokens()
    sequence = recipe.data.max_length
    patches = model.vision_patches()  # per view, after any down-sampling
    objective = OBJECTIVES[stage.objective]
    lm = objective.lm  # an `aux` stage back-propagates no LM loss
    backprop_llm = trained["llm"] or lm and any(trained.values())
    scores_answers = objective.aux and any(
        c.scores_answers and any(p.requires_grad for p in c.parameters()) for c in model.components()
    )
    activations_with = functools.partial(
        activations,
        config,
        stage.batch_size,
        sequence,
        images,
        2 if half or dtype != torch.float32 else 4,
        trained["vision"],
        backprop_llm,
        lm_loss=lm,
        vision_patches=patches,
        runs_llm=objective.lm or objective.aux,
        scores_answers=scores_answers,
    )
    gc = trainer.gradient_checkpointing
    prefill = prefill_flops(
        config,
        max(sequence - visual, 0),
        visual,
        projector_flops=projector_flops,
        images=images,
        vision_patches=patches,
    )
    per_sample = training_flops(
        prefill,
        {
            "vision": trained["vision"],
            "projector": trained["projector"] or trained["compressors"],
            "llm": trained["llm"],
        },
        {"vision": gc.vision, "llm": gc.llm},
    )
    dtype_bytes = torch.finfo(dtype).bits // 8
    return StagePlan(
        stage.name,
        rows,
        stage.batch_size,
        accumulate,
        world,
        steps,
        note,
        model_states(
            trainer.strategy,
            total,
            trainable,
            world,
            half,
            largest_module(model),
            dtype_bytes,
            mixed=trainer.precision.endswith("-mixed"),
        ),
        activations_with(checkpoint_llm=gc.llm, checkpoint_vision=gc.vision),
        per_sample * stage.batch_size * accumulate * world,
        plain=activations_with(checkpoint_llm=False, checkpoint_vision=False),
        checkpointed=activations_with(checkpoint_llm=True, checkpoint_vision=True),
    )


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80G' or '80' → bytes. GPU memory is counted in GiB, as nvidia-smi's
    MiB are (an "80 GB" A100 has 81,920 MiB)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G").strip()
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a memory size (e.g. 80GB)") from None
    if gib <= 0:
        raise ValueError(f"{text!r}: memory must be positive")
    return gib * GiB


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def format_plan(
    recipe: Recipe, plans: list[StagePlan], tflops: float, gpu_memory: float | None
) -> tuple[str, list[str]]:
    """(the report, warnings: stages that do not fit `gpu_memory` bytes, and what to change)."""
    trainer = recipe.trainer
    lines, warnings = [], []
    gc = trainer.gradient_checkpointing
    checkpointed = [p for p, on in (("llm", gc.llm), ("vision", gc.vision)) if on]
    lines.append(
        f"{recipe.source}: {trainer.strategy}, {trainer.precision}, {trainer.devices} device(s) × "
        f"{trainer.num_nodes} node(s), max_length {recipe.data.max_length}, gradient checkpointing: "
        + (", ".join(checkpointed) or "off")
    )
    for index, plan in enumerate(plans):
        key = f"stages.{index}"
        total = sum(t + f for _, _, t, f in plan.parts)
        trainable = sum(t for _, _, t, _ in plan.parts)
        parts = " · ".join(
            f"{part} {_count(t + f)}" + (f" ({_count(t)} trained, {mode})" if t else " frozen")
            for part, mode, t, f in plan.parts
            if t + f
        )
        lines.append(f"stage {plan.name!r}")
        lines.append(f"  parameters  {_count(total)} ({_count(trainable)} trainable): {parts}")
        lines.append(
            f"  batch       {plan.micro_batch} per device × {plan.accumulate} accumulation × "
            f"{plan.world} device(s) = {plan.global_batch} per step"
        )
        steps = f"{plan.steps:,}" if plan.steps is not None else "?"
        lines.append(f"  steps       {steps} ({plan.steps_note})")
        s, a = plan.states, plan.activations
        lines.append(
            f"  memory      {_gib(plan.memory)} per device: model states {_gib(s.total)} (weights "
            f"{_gib(s.weights)}, gradients {_gib(s.gradients)}, optimizer {_gib(s.optimizer)}) + "
            f"activations {_gib(a.total)} (LLM {_gib(a.llm)}, loss {_gib(a.loss)}, vision {_gib(a.vision)}"
            + (f", forward {_gib(a.forward)})" if a.forward else ")")
        )
        lines.append(
            f"              activations without gradient checkpointing {_gib(plan.plain.total)}, "
            f"with it (LLM and vision) {_gib(plan.checkpointed.total)}"
        )
        per_device = tflops * 1e12 * plan.world
        step_time = plan.flops_per_step / per_device
        compute = f"  compute     {plan.flops_per_step / 1e15:.3g} PFLOP per step"
        if plan.steps is not None:
            compute += (
                f", {plan.flops_per_step * plan.steps / 1e18:.3g} EFLOP in all; at {tflops:g} TFLOP/s "
                f"per device: {step_time:.2f} s per step, {_duration(step_time * plan.steps)}"
            )
        lines.append(compute)
        if gpu_memory is not None:
            if plan.memory <= gpu_memory:
                lines.append(f"  fits        {_gib(plan.memory)} of {_gib(gpu_memory)} per device")
            else:
                advice = [f"{key}.batch_size (with {key}.global_batch_size kept, accumulation grows)"]
                if not gc.llm and plan.activations.llm:
                    advice.append("trainer.gradient_checkpointing.llm=true")
                if trainer.strategy != "deepspeed_stage_3" and trainable:
                    advice.append("trainer.strategy=deepspeed_stage_3")
                warnings.append(
                    f"{recipe.source} stage {plan.name!r} needs {_gib(plan.memory)} per device, more "
                    f"than {_gib(gpu_memory)}: lower " + ", or set ".join(advice)
                )
    return "\n".join(lines), warnings
