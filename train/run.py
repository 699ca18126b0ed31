"""Run a recipe: build the model, train each stage with Lightning, evaluate, save.

load recipe → build model → for each stage: freeze policy → data → Trainer.fit
→ held-out accuracy → trainable weights (+ llava-hf base when the model is one)
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from safetensors.torch import load_file, save_file

from data.synth import region_classes
from models.build import build, save_as_llava_hf
from models.region_head import RegionHead
from train.accuracy import evaluate_accuracy
from train.datamodule import VtcDataModule, split_shards
from train.freeze import apply_stage, format_table, has_lora, parts_of
from train.module import VtcModule
from train.outputs import run_metadata, write_atomic, write_dir_atomic, write_json_atomic, write_text_atomic
from train.recipe import DEFAULT_RECIPE, REPO_ROOT, Recipe, load_recipe, recipe_to_yaml, resolve_base
from train.strategy import build_strategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Lightning advertises a cloud logger at every Trainer start; keep its other messages.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def run_dir_of(recipe: Recipe) -> Path:
    out = Path(recipe.output)
    return out if out.is_absolute() else REPO_ROOT / out


def ensure_base(recipe: Recipe) -> None:
    """A recipe on `run:tiny-base` needs the tiny base: train it first if it is missing."""
    base = recipe.model.base
    if base.startswith("run:") and not (Path(resolve_base(base)) / "config.json").is_file():
        if base != "run:tiny-base":
            raise FileNotFoundError(
                f"model.base {base!r}: {resolve_base(base)} has no model; train that run first"
            )
        print(
            f"[vtc] the tiny base ({resolve_base(base)}) is missing: training it first with {DEFAULT_RECIPE}"
        )
        run_recipe(load_recipe(DEFAULT_RECIPE))


def build_from_recipe(recipe: Recipe):
    """The recipe's model before training: its base with its projector and compressors."""
    model = recipe.model
    return build(
        resolve_base(model.base),
        model.projector,
        model.compressors,
        tiny=model.tiny,
        dtype=DTYPES[model.dtype],
        seed=recipe.seed,
        reinit_projector=model.reinit_projector,
    )


def run_recipe(recipe: Recipe) -> dict:
    ensure_base(recipe)
    run_dir = run_dir_of(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    if is_zero:
        write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    built = build_from_recipe(recipe)
    if recipe.model.init:
        loaded = load_trainables(built.model, recipe.model.init)
        print(f"[vtc] initialised {loaded} tensors from {recipe.model.init}")
    started = time.time()
    trained_parts: set[str] = set()
    records = []
    for stage in recipe.stages:
        parts, record = train_stage(recipe, stage, built, run_dir, is_zero)
        trained_parts |= parts
        records.append(record)
    train_seconds = time.time() - started
    if not is_zero:
        return {}
    write_json_atomic(run_dir / "meta.json", run_metadata(recipe.source, records))
    save_trainables(built.model, trained_parts, run_dir)
    if recipe.model.projector.name == "mlp2x_gelu" and not recipe.model.compressors:
        if has_lora(built.model):  # adapter-wrapped modules do not load as plain llava-hf
            print(
                "[vtc] LoRA adapters are in trainable.safetensors; `vtc export RUN_DIR OUT --merge-lora` "
                "writes the merged model"
            )
        else:
            write_dir_atomic(run_dir / "hf", lambda tmp: save_as_llava_hf(built, tmp))
    size = built.hf.config.vision_config.image_size
    test = split_shards(recipe.data, "test")
    metrics = evaluate_accuracy(
        built.model,
        built.tokenizer,
        test,
        size,
        limit=recipe.eval.limit,
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
    )
    metrics["train_seconds"] = round(train_seconds, 1)
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def train_stage(recipe: Recipe, stage, built, run_dir: Path, is_zero: bool) -> tuple[set[str], dict]:
    """Train one stage; returns the parts it trained and a record for meta.json."""
    model = built.model
    rows = apply_stage(model, stage)
    if is_zero:
        print(format_table(stage.name, rows), flush=True)
    world = recipe.trainer.devices * recipe.trainer.num_nodes
    accumulate = (stage.global_batch_size or stage.batch_size * world) // (stage.batch_size * world)
    region_head = None
    if stage.objective == "region":
        region_head = RegionHead(model.dims.vision_width, region_classes(recipe.data.synthetic.grid))
    data = VtcDataModule(
        recipe.data,
        stage,
        built.tokenizer,
        built.hf.config.vision_config.image_size,
        model.image_token_id,
        model.visual_tokens if model.hd_grids else model.visual_tokens(),
        model.vision.grid,
        recipe.seed,
        hd_grids=model.hd_grids,
    )
    steps = stage.steps
    if steps is None:
        per_epoch = len(data.dataset) // (stage.batch_size * world * accumulate)
        steps = max(1, math.ceil(stage.epochs * per_epoch))
    module = VtcModule(model, stage, steps, region_head, run_dir, recipe.trainer.record_samples)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=recipe.trainer.accelerator,
        devices=recipe.trainer.devices,
        num_nodes=recipe.trainer.num_nodes,
        strategy=build_strategy(recipe.trainer),
        precision=recipe.trainer.precision,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=stage.optim.grad_clip,
        log_every_n_steps=recipe.trainer.log_every,
        logger=loggers(recipe, run_dir, stage.name),
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=run_dir,
    )
    started = time.time()
    trainer.fit(module, datamodule=data)
    record = {
        "name": stage.name,
        "steps": trainer.global_step,
        "samples_seen": trainer.global_step * stage.batch_size * world * accumulate,
        "seconds": round(time.time() - started, 1),
        "skipped_samples": len(module.skipped),
    }
    return {part for part, mode, trainable, _ in rows if trainable}, record


def loggers(recipe: Recipe, run_dir: Path, stage_name: str) -> list:
    out = [CSVLogger(run_dir, name="logs", version=stage_name)]
    if recipe.wandb.enabled:
        os.environ.setdefault("WANDB_MODE", recipe.wandb.mode)
        out.append(
            WandbLogger(
                project=recipe.wandb.project,
                name=recipe.wandb.name or run_dir.name,
                save_dir=str(run_dir),
                group=run_dir.name,
                job_type=stage_name,
            )
        )
    return out


def load_trainables(model, source: str) -> int:
    """Load `part.name` tensors saved by `save_trainables` (a run dir or the file itself)."""
    path = Path(source)
    path = path / "trainable.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model.init: no trainable weights at {path}")
    tensors = load_file(str(path))
    for part, module in parts_of(model).items():
        own = {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if own:
            missing = set(own) - set(module.state_dict())
            if missing:
                raise ValueError(
                    f"model.init: {path} has {part} weights this model lacks, e.g. {sorted(missing)[:3]}"
                )
            module.load_state_dict(own, strict=False)
    return len(tensors)


def save_trainables(model, parts: set[str], run_dir: Path) -> Path:
    """Only what was trained (the parts any stage unfroze, incl. LoRA adapters), as safetensors."""
    modules = {
        "vision": model.vision,
        "projector": model.projector,
        "compressors": model.compressors,
        "llm": model.llm,
    }
    tensors = {}
    for part in sorted(parts):
        for name, tensor in modules[part].state_dict().items():
            tensors[f"{part}.{name}"] = tensor.detach().contiguous().cpu()
    path = run_dir / "trainable.safetensors"
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    return path
