"""Run a recipe: build the model, train each stage with Lightning, evaluate, save.

load recipe → (resume point) → build model → for each stage: freeze policy → data →
Trainer.fit (periodic checkpoints; resumed from one when asked) → held-out accuracy →
trainable weights (+ llava-hf base when the model is one)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file, save_file

from data.errors import UserError
from data.locks import held_alone
from data.synth import region_classes
from models.build import DTYPES, build, save_as_llava_hf
from models.gather import is_partitioned
from models.lora import has_lora, unwrapped_name
from models.region_head import RegionHead
from train.accuracy import evaluate_accuracy
from train.checkpoint import (
    CKPT_DIR,
    CheckpointInfo,
    PeriodicCheckpoint,
    Termination,
    TrainablesCheckpointIO,
    changed_inputs,
    deepspeed_damage,
    inputs_identity,
    latest_checkpoint,
    list_checkpoints,
    recipe_drift,
    remove_partial_saves,
    unreadable_checkpoint,
)
from train.datamodule import VtcDataModule, split_shards
from train.freeze import apply_stage, format_table
from train.launch import cluster_plugins, global_rank
from train.module import VtcModule
from train.objectives import OBJECTIVES
from train.outputs import run_metadata, write_atomic, write_dir_atomic, write_json_atomic, write_text_atomic
from train.progress import StageProgressBar, StepClock
from train.recipe import (
    Recipe,
    Stage,
    accumulation,
    model_template,
    recipe_to_yaml,
    resolve_base,
    stage_steps_for,
    stage_templates,
)
from train.strategy import build_strategy
from train.zero import load_state, trainable_state

# Lightning starts every stage's Trainer with a cloud-logger advertisement and a list of the
# accelerators it did not find, and ends it saying max_steps was reached (vtc's own line after
# each stage gives its steps, time and speed); torch's pytree warns about a call inside Lightning:
# none of it is about the user's run. Lightning's other messages (warnings included) stay.
_LIGHTNING_CHATTER = (
    "litlogger",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "`Trainer.fit` stopped: `max_steps=",
)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not any(text in record.getMessage() for text in _LIGHTNING_CHATTER)
)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output).absolute()  # a relative output is from the working directory


# The first line of the recipe.yaml a run writes: it tells that file from a user's own recipe
# of that name, which a run started in that folder would otherwise replace.
RUN_RECIPE_HEADER = (
    "# the resolved recipe of the run in this folder, written by `vtc train` (`vtc resume` reads it)\n"
)
# What a finished run leaves besides its checkpoints, logs and recipe: the final weights, the
# run's llava-hf model, its metadata and its evaluation report.
FINAL_OUTPUTS = (
    "trainable.safetensors",
    "hf",
    "meta.json",
    "metrics.json",
    "eval.json",
    "eval.md",
    "eval.png",
)
# What a run writes besides recipe.yaml and its report: a folder holding any of these is a run.
RUN_OUTPUTS = ("meta.json", "metrics.json", "trainable.safetensors", CKPT_DIR, "logs", "hf")


def refuse_foreign_output(run_dir: Path) -> None:
    """A run writes recipe.yaml, logs/, ckpt/, ... straight into its output folder. Refuse a
    folder that holds files and is not a run already (`output=.` in a project folder, or the
    folder of the user's own recipe.yaml, which would be replaced by the resolved one)."""
    if not run_dir.is_dir():
        return
    # hidden names aside: a run never writes over one, and its own temporary files are hidden
    # (another rank may be writing recipe.yaml through `.recipe.yaml.*` right now)
    entries = sorted(path.name for path in run_dir.iterdir() if not path.name.startswith("."))
    if not entries or any((run_dir / name).exists() for name in RUN_OUTPUTS):
        return
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file() and recipe.read_text(errors="replace").startswith(RUN_RECIPE_HEADER):
        return  # a run stopped before its first checkpoint
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise UserError(
        f"output {run_dir} already holds files that are not a vtc run ({shown}); a run writes "
        "recipe.yaml, ckpt/, logs/ and its weights into its output folder, so give the recipe a new "
        "or empty one (output=PATH)"
    )


def is_run_dir(path: Path) -> bool:
    """A folder `run_recipe` wrote (a shipped base keeps a recipe.yaml too, but no meta.json)."""
    return (path / "recipe.yaml").is_file() and (path / "meta.json").is_file()


def ensure_base(recipe: Recipe) -> None:
    """A recipe on `run:NAME` needs that run's llava-hf model."""
    base = recipe.model.base
    if base.startswith("run:") and not (Path(resolve_base(base)) / "config.json").is_file():
        raise FileNotFoundError(
            f"model.base {base!r}: {resolve_base(base)} has no model; train that run first"
        )


def build_from_recipe(recipe: Recipe):
    """The recipe's model before training: its base with its projector and compressors, and the
    prompt template its stages tune it to answer in."""
    model = recipe.model
    built = build(
        resolve_base(model.base),
        model.projector,
        model.compressors,
        tiny=model.tiny,
        dtype=DTYPES[model.dtype],
        seed=recipe.seed,
        reinit_projector=model.reinit_projector,
        views=model.views,
    )
    built.template = model_template(recipe)
    return built


def resume_point(
    recipe: Recipe, run_dir: Path, resume: str | None, force: bool, restart: bool
) -> CheckpointInfo | None:
    """The checkpoint to continue from (None: start from scratch), after checking the recipe
    did not change in a way that matters. `resume` is "auto" (newest complete) or a folder."""
    existing = list_checkpoints(run_dir)
    if restart:
        return None
    if not existing and (run_dir / "trainable.safetensors").is_file():  # its checkpoints deleted
        raise UserError(
            f"{run_dir} holds a finished run and no checkpoint to resume from: `vtc train ... "
            "--restart` trains it again from scratch (replacing it); or give the recipe another output"
        )
    if resume is None:
        if existing:
            raise UserError(
                f"{run_dir} already has checkpoints (newest: {existing[-1].path.name}): pass "
                "--resume auto to continue that run, or --restart to train it again from scratch"
            )
        return None
    if resume == "auto":
        start = latest_checkpoint(run_dir)
        if start is None:
            print(f"[vtc] --resume auto: no checkpoint in {run_dir}; starting from scratch")
            return None
    else:
        start = next((c for c in existing if c.path.resolve() == Path(resume).resolve()), None)
        if start is None:
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint of {run_dir}")
    check_resumable(start, recipe)
    if force:  # what the stage trained on is not held against the resume either (`check_same_inputs`)
        start = dataclasses.replace(start, inputs=None)
    saved_recipe = run_dir / "recipe.yaml"
    if saved_recipe.is_file() and not force:
        drift = recipe_drift(yaml.safe_load(saved_recipe.read_text()), yaml.safe_load(recipe_to_yaml(recipe)))
        if drift:
            raise UserError(
                f"refusing to resume {run_dir}: the recipe changed since the run started\n  "
                + "\n  ".join(drift)
                + "\n(pass --force to resume anyway)"
            )
    return start


# the checkpoint layout each strategy reads (`CheckpointInfo.layout`)
LAYOUT_OF_STRATEGY = {
    "deepspeed_stage_1": "ZeRO-1/2",
    "deepspeed_stage_2": "ZeRO-1/2",
    "deepspeed_stage_3": "ZeRO-3",
}
STRATEGIES_OF_LAYOUT = {
    "vtc": "trainer.strategy=ddp (or auto)",
    "ZeRO-1/2": "trainer.strategy=deepspeed_stage_2 (or deepspeed_stage_1)",
    "ZeRO-3": "trainer.strategy=deepspeed_stage_3",
}


def check_resumable(start: CheckpointInfo, recipe: Recipe) -> None:
    """Refuse, even with --force and before anything is built or written, to resume a checkpoint
    the recipe's strategy cannot read (it failed once the model was built, with DeepSpeed's
    traceback or a message calling the checkpoint damaged, after the forced recipe had replaced
    the run's): DeepSpeed reads only its own layout, written by the same ZeRO stage (1 and 2
    alike), with the optimizer states partitioned over as many processes as now (it cannot
    partition them again); the other strategies read only vtc's. A DeepSpeed checkpoint damaged
    after its save (`deepspeed_damage`) is named, as vtc's own layout's are when they load."""
    damage = deepspeed_damage(start) if start.sharded else None
    if damage is not None:
        raise UserError(unreadable_checkpoint(start.path, damage))
    strategy = recipe.trainer.strategy
    wrote, reads = start.layout, LAYOUT_OF_STRATEGY.get(strategy, "vtc")
    if wrote != reads:
        written_by = "vtc in its own layout" if wrote == "vtc" else f"DeepSpeed {wrote}"
        raise UserError(
            f"cannot resume {start.run_dir} under trainer.strategy {strategy}: its checkpoint "
            f"{start.path.name} was written by {written_by}, which {strategy} cannot read; resume "
            f"it with {STRATEGIES_OF_LAYOUT[wrote]}"
        )
    now = recipe.trainer.devices * recipe.trainer.num_nodes
    if start.processes is not None and start.processes != now:
        raise UserError(
            f"cannot resume {start.run_dir} on {now} process(es): DeepSpeed's checkpoint "
            f"{start.path.name} holds optimizer states partitioned over {start.processes}, which "
            f"DeepSpeed cannot partition again; resume with trainer.devices × trainer.num_nodes = "
            f"{start.processes}"
        )


def check_same_inputs(start: CheckpointInfo, inputs: dict) -> None:
    """Refuse to resume a stage whose training shards or base model changed since `start` was
    saved (`--force` clears what it recorded): the loader's position is a place in an order of
    the old samples, and the checkpoint holds only the trained weights, the rest coming from the
    base, so the resumed stage would not go on as the interrupted one would have."""
    changed = changed_inputs(start.inputs, inputs)
    if changed:
        raise UserError(
            f"refusing to resume {start.run_dir}: what it trains on changed since {start.path.name}\n  "
            + "\n  ".join(changed)
            + "\n(the resumed stage would not go on as the interrupted one would have; pass --force "
            "to resume anyway)"
        )


def run_recipe(recipe: Recipe, resume: str | None = None, force: bool = False, restart: bool = False) -> dict:
    """Train every stage of the recipe, evaluate, save. `resume`: "auto" or a checkpoint folder
    (see `resume_point`); `restart` discards the run's checkpoints and starts over."""
    ensure_base(recipe)
    run_dir = run_dir_of(recipe)
    is_zero = global_rank(recipe.trainer.devices) == 0  # the one process that writes the run directory
    refuse_foreign_output(run_dir)  # before the lock file goes in
    with run_lock(run_dir) if is_zero else contextlib.nullcontext(), torch_threads(recipe.trainer.threads):
        return _run(recipe, run_dir, is_zero, resume, force, restart)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` (None: left as they are) while the block runs,
    then as they were: a run started from Python (a notebook, a test) leaves its caller's
    setting alone."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Held by the process that writes a run while it runs: a second `vtc train` or `vtc resume`
    on the same output (the same command started twice, a requeued job while the first still
    runs) is refused instead of writing the same checkpoints and logs at once (`held_alone`)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a read-only or missing mount: before anything is trained
        raise UserError(
            f"output {run_dir}: cannot create the run folder there ({err.strerror}); give output=PATH"
        ) from None
    path = run_dir / ".vtc-lock"
    busy = (
        f"another vtc process is training {run_dir} now (it holds {path}); wait for it to end, "
        "or give this run another output"
    )
    with held_alone(path, busy) as held:
        if not held:
            print(f"[vtc] {run_dir} cannot be locked (no flock there); nothing stops a second run writing it")
        yield


def _run(
    recipe: Recipe, run_dir: Path, is_zero: bool, resume: str | None, force: bool, restart: bool
) -> dict:
    """`run_recipe` once the run's folder is checked (and locked by the process that writes it)."""
    start = resume_point(recipe, run_dir, resume, force, restart)
    done = finished_metrics(recipe, run_dir, start)
    if done is not None:  # e.g. a job script that resumes whatever state the run is in
        print(
            f"[vtc] {run_dir} finished training at {start.path.name} and was evaluated with these eval "
            f"settings; nothing to do (`vtc evaluate {run_dir}` measures it again, and so does a resume "
            "with other eval.* settings)"
        )
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_zero:
        remove_partial_saves(run_dir)
        if restart or start is not None:
            discard_former_history(run_dir, start)
        write_text_atomic(run_dir / "recipe.yaml", RUN_RECIPE_HEADER + recipe_to_yaml(recipe))
    if start is not None and start.stage_done and start.stage_index == len(recipe.stages) - 1:
        again = "; evaluating it again" if recipe.eval.after_training else ""
        print(f"[vtc] {run_dir} finished training at {start.path.name}: nothing left to train{again}")
    elif start is not None:
        print(f"[vtc] resuming from {start.path} (stage {start.stage!r}, step {start.step})")
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    # indexed now, so that a bad test shard is refused before training, not after it
    test = split_shards(recipe.data, "test") if is_zero and recipe.eval.after_training else None
    built = build_from_recipe(recipe)
    # names of every weight the run's trainable.safetensors holds: what some stage trained so
    # far, and what `model.init` loaded, which is the run's too even where no stage trains it
    # (routers trained on an initialised TokenPacker: its export needs that TokenPacker)
    saved: set[str] = set()
    if recipe.model.init:
        saved = load_trainables(built.model, recipe.model.init)
        print(f"[vtc] initialised {len(saved)} tensors from {recipe.model.init}")
    started = time.time()
    records = list(start.records) if start else []
    with Termination().handling() as termination:
        for index, stage in enumerate(recipe.stages):
            if start is not None and index < start.stage_index:
                apply_stage(built.model, stage)  # LoRA structure as it was; weights come from the checkpoint
                add_trained(built.model, saved)
                continue
            resume_from = start if start is not None and index == start.stage_index else None
            records.append(
                train_stage(
                    recipe, index, stage, built, run_dir, is_zero, saved, records, resume_from, termination
                )
            )
    if termination.requested:  # it came as the last step was being saved: that checkpoint is the end
        print(
            f"[vtc] terminated ({termination.name}) as training ended; `vtc resume {run_dir}` writes the "
            "final weights and evaluates them",
            file=sys.stderr,
        )
        raise SystemExit(termination.exit_status)
    train_seconds = time.time() - started
    save_trainables(built.model, saved, run_dir, write=is_zero)
    if not is_zero:
        return {}
    built = whole_model(built, run_dir)
    write_json_atomic(run_dir / "meta.json", run_metadata(recipe.source, records))
    if recipe.model.plain_llava:
        if has_lora(built.model):  # adapter-wrapped modules do not load as plain llava-hf
            print(
                "[vtc] LoRA adapters are in trainable.safetensors; `vtc export RUN_DIR OUT --merge-lora` "
                "writes the merged model"
            )
        else:
            write_dir_atomic(run_dir / "hf", lambda tmp: save_as_llava_hf(built, tmp))
    if not recipe.eval.after_training:
        metrics = {"train_seconds": round(train_seconds, 1)}
        write_json_atomic(run_dir / "metrics.json", metrics)
        return metrics
    size = built.hf.config.vision_config.image_size
    metrics = evaluate_accuracy(
        built.model,
        built.tokenizer,
        test,
        size,
        template=built.template,
        limit=recipe.eval.limit,
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
    )
    metrics["train_seconds"] = round(train_seconds, 1)
    write_json_atomic(run_dir / "metrics.json", metrics)
    if recipe.eval.baselines:
        compare(run_dir, recipe, built.model.visual_tokens())
    return metrics


def whole_model(built, run_dir: Path):
    """The trained model rank 0 writes `hf/` from and evaluates: `built` itself, or, where
    DeepSpeed ZeRO-3 left its weights partitioned across the ranks, the run rebuilt from what it
    wrote (`trainable.safetensors`, as `vtc evaluate RUN` rebuilds it), on the same device. The
    other ranks have ended by then, so a partitioned model's forward, which gathers every
    weight from every rank, would fail or wait forever on rank 0, and its `state_dict` holds
    empty tensors (tests/test_zero.py -k after_training)."""
    params = list(built.model.parameters())
    if not any(is_partitioned(p) for p in params):
        return built
    from train.export import rebuild_run

    device = params[0].device  # a partitioned parameter keeps an empty tensor where its shard is
    rebuilt = rebuild_run(run_dir)[0]
    rebuilt.model.to(device)
    return rebuilt


def finished_metrics(recipe: Recipe, run_dir: Path, start: CheckpointInfo | None) -> dict | None:
    """The metrics of a run whose resume would do nothing new, else None: `start` ends its last
    stage, and its final outputs were written (metrics.json last but for the comparison,
    eval.json, where the recipe asks for one) under the same `eval` settings as `recipe`'s.
    Every rank reads the same files, so all of them take the same way."""
    if start is None or not start.stage_done or start.stage_index != len(recipe.stages) - 1:
        return None
    metrics, saved = run_dir / "metrics.json", run_dir / "recipe.yaml"
    compared = recipe.eval.after_training and recipe.eval.baselines
    if not metrics.is_file() or not saved.is_file() or (compared and not (run_dir / "eval.json").is_file()):
        return None
    before = yaml.safe_load(saved.read_text()).get("eval")
    if before != yaml.safe_load(recipe_to_yaml(recipe)).get("eval"):
        return None
    return json.loads(metrics.read_text())


def discard_former_history(run_dir: Path, start: CheckpointInfo | None) -> None:
    """Before a restart (`start` None) or a resume from an earlier checkpoint than the newest:
    remove what the history being replaced left, so that a crash of the new one cannot leave it
    beside the new checkpoints as if it were theirs (`vtc evaluate` would measure the former
    weights): the newer checkpoints and the final outputs; on a restart also the logs, the
    checkpoints' reports (RUN/eval/), the skipped-sample lists and the wandb ids (its stages log
    to new wandb runs; wandb's own run folders, unsynced offline runs among them, stay)."""
    newer = [c for c in list_checkpoints(run_dir) if start is None or c.order > start.order]
    if start is not None and not newer:
        return  # the newest checkpoint: nothing of another history to replace
    names = FINAL_OUTPUTS + (("logs", "eval", "wandb-ids.json") if start is None else ())
    paths = [c.path for c in newer] + [run_dir / name for name in names if (run_dir / name).exists()]
    if start is None:
        paths += sorted(run_dir.glob("skipped-*.jsonl"))
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if paths:
        what = f"{len(newer)} checkpoint(s)" + "".join(f", {p.name}" for p in paths[len(newer) :])
        why = "--restart" if start is None else f"resuming from the earlier {start.path.name}"
        print(f"[vtc] {why}: removed the former history's {what}")


def check_stage_data(dataset, stage: Stage, index: int, world: int, probe: int = 64) -> None:
    """Refuse a stage that would train on nothing: fewer samples than one batch (the loader
    drops incomplete batches), or none usable among the first `probe` (e.g. a max_length that
    leaves no room for the answers), instead of running every step on an empty batch."""
    from data.dataset import Skipped

    per_batch = stage.batch_size * world
    if len(dataset) < per_batch:
        raise UserError(
            f"stages[{index}] ({stage.name!r}): batch_size {stage.batch_size} × {world} device(s) = "
            f"{per_batch} samples per step, but the training data has only {len(dataset)}"
        )
    items = [dataset[i] for i in range(min(probe, len(dataset)))]
    skipped = [item for item in items if isinstance(item, Skipped)]
    if len(skipped) == len(items):
        raise UserError(
            f"stages[{index}] ({stage.name!r}): none of the first {len(items)} training samples is "
            f"usable; the first ({skipped[0].id}): {skipped[0].reason}"
        )


def compare(run_dir: Path, recipe: Recipe, visual_tokens: int) -> None:
    """The run next to its base and the recipe's training-free baselines at the run's own
    visual-token count: `vtc evaluate`'s table and plot, written into the run directory."""
    from train.evaluate import Settings, evaluate
    from train.evaluation.report import summary

    settings = Settings(
        limit=recipe.eval.compare_limit,
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
        timing=recipe.eval.compare_timing,
        # where the recipe trained: a run kept off the GPU (accelerator cpu) is evaluated off it too
        device="cpu" if recipe.trainer.accelerator == "cpu" else None,
    )
    report = evaluate(str(run_dir), list(recipe.eval.baselines), [visual_tokens], settings=settings)
    print(summary(report))
    print(f"[vtc] comparison written to {run_dir}/eval.md, eval.json, eval.png")


def sparse_gradients(model) -> bool:
    """Whether a trainable component may leave some of its parameters without a gradient."""
    return any(
        c.sparse_gradients and any(p.requires_grad for p in c.parameters()) for c in model.components()
    )


def train_stage(
    recipe: Recipe,
    index: int,
    stage,
    built,
    run_dir: Path,
    is_zero: bool,
    saved: set[str],
    records: list[dict],
    resume_from: CheckpointInfo | None = None,
    termination: Termination | None = None,
) -> dict:
    """Train one stage (from `resume_from`, a checkpoint of this stage, if given; saving and
    stopping when `termination` notes a stop signal); adds what it trains to `saved` and returns its
    record for meta.json."""
    model = built.model
    rows = apply_stage(model, stage)
    checkpointing = recipe.trainer.gradient_checkpointing
    model.set_gradient_checkpointing(llm=checkpointing.llm, vision=checkpointing.vision)
    add_trained(model, saved)
    if is_zero:
        print(format_table(stage.name, rows), flush=True)
    world = recipe.trainer.devices * recipe.trainer.num_nodes
    accumulate = accumulation(stage, world)
    region_head = None
    if OBJECTIVES[stage.objective].region_targets:
        region_head = RegionHead(model.dims.vision_width, region_classes(recipe.data.synthetic.grid))
        region_head.to(next(model.vision.parameters()).dtype)  # the features' dtype (model.dtype)
    data = stage_data(recipe, stage, built)
    check_stage_data(data.dataset, stage, index, world)
    inputs = inputs_identity(data.shards.paths, resolve_base(recipe.model.base))
    if resume_from is not None and not resume_from.stage_done:
        check_same_inputs(resume_from, inputs)
    steps = stage_steps_for(stage, len(data.dataset), world)
    module = VtcModule(
        model,
        stage,
        steps,
        region_head,
        run_dir,
        recipe.trainer.record_samples,
        saved_weights=saved,
        nonfinite_loss=recipe.trainer.nonfinite_loss,
    )
    if is_zero:
        for component in model.components():  # e.g. a compression schedule over the stage's steps
            for line in component.describe(module.stage_progress(0)):
                print(f"  {component.registry_name}: {line}", flush=True)
    clock = StepClock(
        before=resume_from.timed if resume_from else (0, 0.0),
        seconds_before=resume_from.stage_seconds if resume_from else 0.0,
    )
    checkpoints = PeriodicCheckpoint(
        run_dir,
        index,
        stage.name,
        recipe.checkpoint.every,
        recipe.checkpoint.keep_last,
        clock,
        records,
        termination,
        inputs,
    )
    logs = loggers(recipe, run_dir, stage.name, is_zero)
    if resume_from is not None and is_zero:
        continue_csv_log(logs[0], resume_from.step, pending_row=resume_from.log_row)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=recipe.trainer.accelerator,
        devices=recipe.trainer.devices,
        num_nodes=recipe.trainer.num_nodes,
        strategy=build_strategy(recipe.trainer, sparse_gradients(model)),
        precision=recipe.trainer.precision,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=stage.optim.grad_clip,
        log_every_n_steps=min(recipe.trainer.log_every, steps),  # a short stage still logs its last step
        logger=logs,
        # the clock reads a step's end before the checkpoint of that step saves its timing, and
        # the bar shows the step before it is saved (and before a SIGTERM stops after that save)
        callbacks=[clock, StageProgressBar(stage.name), checkpoints],
        plugins=[TrainablesCheckpointIO(), *cluster_plugins()],
        use_distributed_sampler=False,  # the datamodule's loader shards by rank and resumes
        enable_checkpointing=False,  # vtc's PeriodicCheckpoint saves (atomically, trainables only)
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=run_dir,
    )
    if termination is not None:
        # The run's Termination handles the stop signals from start to end. Lightning would put
        # its own handler in as fitting starts, until the stage's first hook put vtc's back; its
        # handler broadcasts from inside itself under DDP, so a rank signalled alone in that
        # window (a stop as a stage starts) waited for the others forever.
        trainer._signal_connector.register_signal_handlers = lambda: None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from.path if resume_from else None)
    except SIGTERMException:  # Lightning's SystemExit carries no status: a terminated run must not exit 0
        raise SystemExit(termination.exit_status if termination else 128 + signal.SIGTERM) from None
    if recipe.wandb.enabled and is_zero:  # one wandb run per stage: the next stage starts its own
        import wandb

        wandb.finish()
    record = {
        "name": stage.name,
        "steps": trainer.global_step,
        "samples_seen": trainer.global_step * stage.batch_size * world * accumulate,
        "seconds": round(clock.stage_seconds(), 1),  # summed over a crash and its resume
        "samples_per_second": throughput(clock, stage.batch_size * world * accumulate),
        "skipped_samples": len(module.skipped),
        "nonfinite_skipped_steps": module.nonfinite_skipped,
    }
    if resume_from is not None:
        record["resumed_from"] = resume_from.path.name
    if is_zero:
        rate = record["samples_per_second"]
        speed = "" if rate is None else f", {rate:.1f} samples/s after the first step"
        print(f"[vtc] stage {stage.name!r}: {record['steps']} steps in {record['seconds']:.0f} s{speed}")
    return record


def stage_data(recipe: Recipe, stage, built) -> VtcDataModule:
    """The stage's training data, encoded for the model `built` as the stage trains it."""
    model = built.model
    tiling = model.view_tiling
    if tiling is not None and not stage.views:  # each image its thumbnail alone, fitted the same way
        tiling = tiling.whole_images()
    return VtcDataModule(
        recipe.data,
        stage,
        built.tokenizer,
        built.hf.config.vision_config.image_size,
        model.image_token_id,
        model.image_sequence_tokens if model.view_grids and stage.views else model.visual_tokens(),
        model.vision.grid,
        recipe.seed,
        stage_templates(stage, recipe.model),
        tiling=tiling,
    )


def throughput(clock: StepClock, samples_per_step: int) -> float | None:
    """Training samples a second over the stage's steps after its first (None: under two steps)."""
    rate = clock.steps_per_second()
    return None if rate is None else round(rate * samples_per_step, 3)


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def add_trained(model, saved: set[str]) -> None:
    """Add to `saved` the weights the stage just applied trains, and rename those LoRA has
    wrapped since they were added (`x.weight` is then `x.base_layer.weight`: a weight
    `model.init` loaded that a LoRA stage now trains through adapters)."""
    now = {unwrapped_name(name): name for name, _ in model.named_parameters()}
    renamed = {now.get(unwrapped_name(name), name) for name in saved}
    saved.clear()
    saved |= renamed | trainable_names(model)


def loggers(recipe: Recipe, run_dir: Path, stage_name: str, is_zero: bool = True) -> list:
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
                # a resumed stage continues its wandb run (only rank 0 logs, and keeps the ids);
                # offline, wandb ignores `resume` with a warning per stage, and the kept id does it
                id=wandb_run_id(run_dir, stage_name) if is_zero else None,
                resume="allow" if os.environ["WANDB_MODE"] != "offline" else None,
            )
        )
        if is_zero:
            start_wandb(out[-1])
    return out


def start_wandb(logger: WandbLogger, wait_seconds: int = 60) -> None:
    """Open the wandb run now. Right after a run was killed, its wandb service process can still
    hold the run id for a moment (it exits once it sees its parent gone): wait for it."""
    import wandb.errors

    for waited in range(wait_seconds + 1):
        try:
            logger.experiment  # noqa: B018  (the property starts the run)
            return
        except Exception as err:  # wandb raises its own ServerResponseError
            held = "in use" in str(err) and waited < wait_seconds
            if not held and isinstance(err, (wandb.errors.UsageError, wandb.errors.CommError)):
                # not logged in, a wrong key, no network: the setup's, before any step is trained
                raise UserError(
                    f"wandb (mode {os.environ.get('WANDB_MODE')}): {err}\n(or log offline: "
                    f"wandb.mode=offline, and upload later: wandb sync {logger.save_dir}/wandb/offline-run-*)"
                ) from err
            if not held:
                raise
            if waited == 0:
                print("[vtc] wandb: the run id is still held by the killed run's service; waiting")
            time.sleep(1)


def wandb_run_id(run_dir: Path, stage_name: str) -> str:
    """The stage's wandb run id, made once and kept in RUN_DIR/wandb-ids.json."""
    path = run_dir / "wandb-ids.json"
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if stage_name not in ids:
        ids[stage_name] = secrets.token_hex(8)
        write_json_atomic(path, ids)
    return ids[stage_name]


def continue_csv_log(logger: CSVLogger, up_to_step: int, pending_row: dict | None = None) -> None:
    """Keep the stage's metrics.csv rows up to the checkpoint's step (Lightning's CSV writer
    starts the file afresh; rows logged after the checkpoint are logged again by the resumed run).
    `pending_row`, the checkpoint's copy of its own step's row, fills in that row if a kill came
    before Lightning wrote it."""
    path = Path(logger.log_dir) / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open(newline="") as file:
            rows = [row for row in csv.DictReader(file) if int(row["step"]) < up_to_step]
    if pending_row is not None and all(int(row["step"]) != pending_row["step"] for row in rows):
        rows.append(dict(pending_row))
    if not rows:
        return
    writer = logger.experiment  # its creation removes the old file
    for row in rows:
        step = int(row.pop("step"))
        writer.log_metrics({k: v for k, v in row.items() if v != ""}, step)  # text kept as written
    writer.save()


def load_trainables(model, source: str, skip: tuple[str, ...] = (), prefix: str = "") -> set[str]:
    """Load `part.name` tensors saved by `save_trainables` (a run dir or the file itself), but
    those whose names start with one of `skip`; returns the names loaded. `prefix`: the saved
    names carry it and only those are read (a step checkpoint keys them as the LightningModule
    does, `model.part.name`, beside training-only heads)."""
    path = Path(source)
    path = path / "trainable.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model.init: no trainable weights at {path}")
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors' error for a damaged file names neither file nor cause
        raise UserError(
            f"{path} cannot be read ({type(err).__name__}: {err}); was it damaged or cut short?"
        ) from err
    saved = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    tensors = {k: v for k, v in saved.items() if not k.startswith(skip)}
    try:
        load_state(model, tensors)  # gathers ZeRO-3 partitions, if the model has them
    except ValueError as err:
        raise UserError(f"model.init: {path} does not fit this model: {err}") from None
    return set(tensors)


def save_trainables(model, names: set[str], run_dir: Path, write: bool = True) -> Path:
    """Only what was trained (the weights some stage unfroze, LoRA adapters included), as
    safetensors keyed `part.name`; frozen weights stay with the base. Under DeepSpeed every rank
    calls it (ZeRO-3 gathers each parameter) and the one with `write` writes."""
    tensors = trainable_state(model, names)
    path = run_dir / "trainable.safetensors"
    if write:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    return path
