"""Checkpoints a killed run resumes from exactly, written so that a crash never damages one.

Layout: RUN_DIR/ckpt/stage{i}-{name}-step{NNNNNNN}/ with
    trainable.safetensors  every weight any stage so far trained (LoRA adapters, projector, ...),
                           keyed as in the LightningModule; frozen weights come from the base
    state.pt               Lightning's training state (optimizer, LR scheduler, loop counters with
                           the data loader's position) + vtc's (RNG states, skipped samples);
                           plain tensors and containers, read back with torch.load(weights_only=True)
    info.json              stage index/name, step, whether the stage was finished; written last
(DeepSpeed writes its own sharded layout in place of the first two, and vtc its `latest`, see
`DeepSpeedSaveHold`; info.json is the same.)

A save goes to a hidden `.tmp-…` folder that is renamed into place only when complete, so a
kill during a save leaves every earlier checkpoint intact, and a half-written folder is never
picked. `latest_checkpoint` orders by (stage, step) from info.json, not by folder name.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors.torch import load_file, save_file

from data.errors import UserError
from models.build import is_model_file
from train.outputs import out_of_room, replace_dir
from train.signals import stop_signals_handled_by

CKPT_DIR = "ckpt"
# DeepSpeed's files, under its tag folder in a checkpoint (`<tag>/`; bf16 ZeRO-1 prefixes the
# optimizer's with `bf16_`)
ZERO_3_WEIGHT_SHARDS = "zero_pp_rank_*_mp_rank_*_model_states.pt"
OPTIMIZER_SHARDS = "*zero_pp_rank_*_mp_rank_*_optim_states.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    stage_index: int
    stage: str
    step: int
    stage_done: bool
    records: list[dict] = field(default_factory=list, compare=False)  # finished stages' meta.json records
    log_row: dict | None = field(default=None, compare=False)  # see pending_log_row
    # wall seconds the stage had trained for when this was saved, over every earlier resume too
    stage_seconds: float = field(default=0.0, compare=False)
    # (optimizer steps, seconds) its throughput clock had timed (see train.progress.StepClock)
    timed: tuple[int, float] = field(default=(0, 0.0), compare=False)
    # what the stage trained on when this was saved (`inputs_identity`); None before vtc kept it
    inputs: dict | None = field(default=None, compare=False)
    # the processes that saved it; None before vtc kept it
    saved_by: int | None = field(default=None, compare=False)

    @property
    def order(self) -> tuple[int, int]:
        return (self.stage_index, self.step)

    @property
    def run_dir(self) -> Path:
        """The run this checkpoint belongs to (`RUN_DIR/ckpt/<this>`)."""
        return self.path.parent.parent

    @property
    def sharded(self) -> bool:
        """DeepSpeed's layout: one shard per rank in place of trainable.safetensors and state.pt."""
        return not (self.path / "trainable.safetensors").is_file()

    @property
    def layout(self) -> str:
        """Which strategies read it back: "vtc" (vtc's own files: any strategy but DeepSpeed's),
        "ZeRO-1/2" or "ZeRO-3" (DeepSpeed's, told apart by its file names: ZeRO-3 writes the
        weights one file per rank, ZeRO-1/2 in one)."""
        if not self.sharded:
            return "vtc"
        return "ZeRO-3" if any(self.path.rglob(ZERO_3_WEIGHT_SHARDS)) else "ZeRO-1/2"

    @property
    def processes(self) -> int | None:
        """The processes a DeepSpeed checkpoint's optimizer states are partitioned over (as
        recorded, else one file each); None for vtc's layout, which any number of processes reads."""
        if not self.sharded:
            return None
        return self.saved_by or len(list(self.path.rglob(OPTIMIZER_SHARDS)))


def deepspeed_damage(checkpoint: CheckpointInfo) -> Exception | None:
    """What leaves a DeepSpeed checkpoint unreadable, found without loading it (None: nothing): a
    process's optimizer states missing, or one of DeepSpeed's files cut short (torch writes zip
    archives, whose directory is at the end: a partial copy lacks it). Every rank loads its own
    files, so one that could not raised torch's error alone while the others waited for it in a
    collective (gloo: `Connection closed by peer`; NCCL: until its timeout)."""
    shards = len(list(checkpoint.path.rglob(OPTIMIZER_SHARDS)))
    if checkpoint.saved_by is not None and shards != checkpoint.saved_by:  # recorded since 2026-12-08
        return FileNotFoundError(
            f"optimizer states of {shards} of the {checkpoint.saved_by} processes that saved it"
        )
    for path in sorted(checkpoint.path.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as err:
            return zipfile.BadZipFile(f"{path.relative_to(checkpoint.path)}: {err}")
    return None


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first by (stage, step)."""
    root = Path(run_dir) / CKPT_DIR
    found = []
    for path in root.glob("stage*") if root.is_dir() else []:
        info_file = path / "info.json"
        if not info_file.is_file():
            continue  # not one of ours
        info = json.loads(info_file.read_text())
        found.append(
            CheckpointInfo(
                path,
                info["stage_index"],
                info["stage"],
                info["step"],
                info["stage_done"],
                info.get("records", []),
                info.get("log_row"),
                info.get("stage_seconds", 0.0),  # 0 in checkpoints saved before vtc kept it
                tuple(info.get("timed", (0, 0.0))),
                info.get("inputs"),
                info.get("processes"),
            )
        )
    return sorted(found, key=lambda c: c.order)


def checkpoint_at(path: Path) -> CheckpointInfo | None:
    """The complete checkpoint whose folder is `path` (`RUN_DIR/ckpt/stage<i>-<name>-step<N>/`);
    None for any other folder."""
    path = Path(path).absolute()
    if path.parent.name != CKPT_DIR or not (path / "info.json").is_file():
        return None
    return next((c for c in list_checkpoints(path.parent.parent) if c.path.absolute() == path), None)


def latest_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def unfinished_run(run_dir: Path, command: str) -> str | None:
    """What to do with a run that has started and not finished (stopped, killed, or still
    training: it has logs or checkpoints but no trainable.safetensors) instead of the `vtc`
    command asked for on it; `command` is that command with `{}` for a folder, e.g.
    "export {} OUT". None for any other folder."""
    run_dir = Path(run_dir)
    started = (run_dir / CKPT_DIR).is_dir() or (run_dir / "logs").is_dir()
    if not started or not (run_dir / "recipe.yaml").is_file() or (run_dir / "trainable.safetensors").exists():
        return None
    newest = latest_checkpoint(run_dir)
    finish = f"`vtc resume {run_dir}` finishes it"
    if newest is None:
        return f"{run_dir} is a run that has not finished and has no checkpoint yet; {finish}"
    if newest.sharded:
        return f"{run_dir} is a run that has not finished; {finish}"
    return (
        f"{run_dir} is a run that has not finished; `vtc {command.format(newest.path)}` takes its newest "
        f"checkpoint (stage {newest.stage!r}, step {newest.step}), or {finish}"
    )


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete `.tmp-…` folders left by saves that were killed; returns what was removed."""
    root = Path(run_dir) / CKPT_DIR
    partial = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


class TrainablesCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dict → a folder of safetensors (weights) + state.pt (the rest)."""

    def __init__(self) -> None:
        self.held: Exception | None = None  # see `holding_errors`
        self._holding = False

    @contextmanager
    def holding_errors(self):
        """Keep an error of a save in the block in `held` instead of raising it. Under DDP only
        rank 0 writes, and Lightning's `save_checkpoint` then waits at a barrier: rank 0 must
        reach it too, so that every rank can learn of the failure (`all_did`) rather than the
        others waiting there for the process group's timeout."""
        self.held, self._holding = None, True
        try:
            yield
        finally:
            self._holding = False

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        try:
            self._write(checkpoint, Path(path))
        except Exception as err:
            if not self._holding:
                raise
            self.held = err

    def _write(self, checkpoint: dict, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in checkpoint["state_dict"].items()}
        save_file(weights, str(folder / "trainable.safetensors"))
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        torch.save(rest, folder / "state.pt")

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        folder = Path(path)
        try:
            # vtc never unpickles arbitrary objects, whatever the caller asks for
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            state["state_dict"] = load_file(str(folder / "trainable.safetensors"))
        except Exception as err:  # what a damaged file raises depends on its format and the damage
            raise UserError(unreadable_checkpoint(folder, err)) from err
        return state

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class DeepSpeedSaveHold:
    """`TrainablesCheckpointIO.holding_errors` for DeepSpeed, which writes a checkpoint through
    its engine on every rank (each its optimizer shard; rank 0 the weights) and ends the save at
    a barrier. A write that fails on some ranks alone (a shared disk filling as the shards are
    written, one node's disk) would leave the others at that barrier until the process group's
    timeout. In `holding_errors` the first error of a write is kept in `held` and that save's
    later writes on that rank are skipped, so every rank reaches the barrier and can learn of it
    (`all_did`). DeepSpeed's `latest` file, which rank 0 alone writes outside its checkpoint
    engine, is left to vtc (`write_latest`, after every rank has written); its loader reads it."""

    # the engine's writes in its save: (attribute of the engine or None for itself, method)
    WRITES = (
        ("checkpoint_engine", "save"),
        ("checkpoint_engine", "makedirs"),
        (None, "_copy_recovery_script"),
    )

    def __init__(self, engine) -> None:
        self.engine = engine
        self.held: Exception | None = None
        self.tag: str | None = None  # the tag of the save in the block

    @contextmanager
    def holding_errors(self):
        self.held, self.tag = None, None
        owners = {None: self.engine, "checkpoint_engine": self.engine.checkpoint_engine}
        patches = [
            (owners[owner], name, self._held(getattr(owners[owner], name))) for owner, name in self.WRITES
        ]
        patches.append((self.engine, "save_checkpoint", self._without_latest(self.engine.save_checkpoint)))
        with patched_attributes(patches):
            yield

    def _held(self, write):
        def call(*args, **kwargs):
            if self.held is not None:  # this save already failed on this rank: none of the rest
                return None
            try:
                return write(*args, **kwargs)
            except Exception as err:
                self.held = err
                return None

        return call

    def _without_latest(self, save):
        def call(save_dir, tag=None, **kwargs):
            self.tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
            return save(save_dir, tag=tag, **{**kwargs, "save_latest": False})

        return call

    def write_latest(self, folder: Path) -> None:
        """Rank 0, once every rank has written: what DeepSpeed's `latest` would have held."""
        if self.tag is not None:
            (folder / "latest").write_text(self.tag)


@contextmanager
def patched_attributes(patches: list[tuple[object, str, object]]):
    """Set each (object, name, value) on that instance for the block, then put back what it had
    (its class's attribute again where it had none of its own)."""
    missing = object()
    former = [(owner, name, vars(owner).get(name, missing)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(former):
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def unreadable_checkpoint(folder: Path, err: Exception) -> str:
    """What to say of a checkpoint whose files cannot be read back. vtc's saves are atomic, so
    it was damaged afterwards (a partial copy between machines, a disk error): name it, and the
    complete checkpoint before it to resume from instead."""
    run = folder.parent.parent
    this = checkpoint_at(folder)
    before = [c for c in list_checkpoints(run) if this is not None and c.order < this.order]
    instead = (
        f"`vtc train {run / 'recipe.yaml'} --resume {before[-1].path}` resumes from the one before it"
        if before
        else "no other checkpoint of the run is complete"
    )
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return (
        f"checkpoint {folder} cannot be read ({type(err).__name__}: {first}): it was damaged after it "
        f"was saved (a partial copy, a disk error); {instead}, or delete it"
    )


class Termination:
    """A stop signal (`train.signals.STOP_SIGNALS`) noted rather than obeyed at once: `PeriodicCheckpoint` saves
    at the end of the optimizer step under way, then ends the stage as Lightning ends it on
    SIGTERM, so a resume loses no step. It is the process's handler for the whole run
    (`handling`); a stage's Trainer registers none of its own (`train.run.train_stage`), which
    would end the stage after the current micro-batch unsaved and, under DDP, broadcast from
    inside the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal this process got

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """e.g. "SIGTERM"; for a process that got none (another rank did), what stopped it."""
        return signal.Signals(self.signum).name if self.signum else "a stop signal to another process"

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports a process the signal ended (SIGTERM's when none)."""
        return 128 + (self.signum or signal.SIGTERM)

    def note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    @contextmanager
    def handling(self):
        """Noted for the block; after it, the handlers that were there before are back."""
        with stop_signals_handled_by(self.note):
            yield self


class PeriodicCheckpoint(L.Callback):
    """Save every `every` optimizer steps, at the stage's last step, and at the step under way
    when a stop signal comes (then stop); keep the newest `keep_last` checkpoints of the run (all
    stages together; every checkpoint holds all weights trained so far)."""

    def __init__(
        self,
        run_dir: Path,
        stage_index: int,
        stage_name: str,
        every: int,
        keep_last: int,
        clock,
        records: list[dict] = (),
        termination: Termination | None = None,
        inputs: dict | None = None,
    ):
        self.root = Path(run_dir) / CKPT_DIR
        self.stage_index, self.stage_name = stage_index, stage_name
        self.records = list(records)  # meta.json records of the stages before this one
        self.every, self.keep_last = every, keep_last
        self.step_seen = 0
        self.clock = clock  # the stage's StepClock, whose timing a resume carries on
        self.termination = termination
        self.inputs = inputs  # recorded, so that a resume can tell they changed (`changed_inputs`)

    def on_train_start(self, trainer, pl_module) -> None:
        self.step_seen = trainer.global_step  # a resumed stage starts at its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step only moves when the optimizer steps: the micro-batches of a gradient
        # accumulation window before that see the step before, which is saved already.
        if step == self.step_seen:
            return
        self.step_seen = step
        terminating = self.terminating(trainer)
        if terminating or step % self.every == 0 or step >= trainer.max_steps:
            check_finite(pl_module, step)
            self.save(trainer, step, stage_done=step >= trainer.max_steps)
        if terminating:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException  # what Lightning raises on SIGTERM, now after the save

    def terminating(self, trainer: L.Trainer) -> bool:
        """Whether a stop signal reached any rank; every rank asks after the same steps, so all agree
        to save and stop at the same one (a single process asks no one)."""
        requested = self.termination is not None and self.termination.requested
        return trainer.strategy.reduce_boolean_decision(requested, all=False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """After Ctrl-C or a stop signal (a scheduler's time limit or early warning, preemption),
        which end the stage: say what is kept and how to go on (Ctrl-C loses the steps after the
        newest checkpoint; a stop signal saved the step it came in)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, KeyboardInterrupt):
            how = "interrupted"
        elif isinstance(exception, SIGTERMException):
            how = f"terminated ({self.termination.name if self.termination else 'SIGTERM'})"
        else:
            return
        if not trainer.is_global_zero:
            return
        run_dir = self.root.parent
        newest = latest_checkpoint(run_dir)
        if newest is None:
            kept = "no checkpoint was saved yet"
        elif (newest.stage_index, newest.step) == (self.stage_index, trainer.global_step):
            kept = f"saved as {newest.path.name}, so nothing is lost"
        else:
            kept = f"the newest checkpoint is {newest.path.name} (stage {newest.stage!r}, step {newest.step})"
        print(
            f"[vtc] {how} at step {trainer.global_step} of stage {self.stage_name!r}; {kept}; "
            f"`vtc resume {run_dir}` goes on from there",
            file=sys.stderr,
        )

    def save(self, trainer: L.Trainer, step: int, stage_done: bool) -> Path:
        final = self.root / f"stage{self.stage_index}-{self.stage_name}-step{step:07d}"
        tmp = self.root / f".tmp-{final.name}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("vtc-checkpoint-prepare")
        # every rank takes part (DeepSpeed writes one shard per rank; DDP writes from rank 0)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)  # it writes, not checkpoint_io
        hold = trainer.strategy.checkpoint_io if engine is None else DeepSpeedSaveHold(engine)
        with self.room_for(tmp):
            with hold.holding_errors():
                trainer.save_checkpoint(tmp, weights_only=False)
            all_did(trainer, f"write checkpoint {final.name}", hold.held)
        error = None
        try:
            if trainer.is_global_zero:
                self._complete(trainer, tmp, final, step, stage_done, hold)
        except Exception as err:
            error = err
        all_did(trainer, f"complete checkpoint {final.name}", error)
        return final

    def _complete(
        self, trainer: L.Trainer, tmp: Path, final: Path, step: int, stage_done: bool, hold
    ) -> None:
        """Rank 0, once every rank has written: DeepSpeed's `latest` (`hold` a DeepSpeedSaveHold),
        info.json, then the folder renamed into place."""
        self.clock.reread(trainer)
        info = {
            "stage_index": self.stage_index,
            "stage": self.stage_name,
            "step": step,
            "stage_done": stage_done,
            "records": self.records,
            "log_row": pending_log_row(trainer, step),
            "stage_seconds": round(self.clock.stage_seconds(), 1),
            "timed": list(self.clock.timed()),
            "inputs": self.inputs,
            "processes": trainer.world_size,
        }
        with self.room_for(tmp):
            if isinstance(hold, DeepSpeedSaveHold):
                hold.write_latest(tmp)
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
        # the aside name starts with .tmp- too, so a resume clears it if a kill strands it
        replace_dir(tmp, final, aside=final.with_name(f".tmp-old-{final.name}"))
        self.prune()

    @contextmanager
    def room_for(self, tmp: Path):
        """A save that fills the disk is removed at once (it holds the space a user must free,
        tens of GB for a 7B's optimizer states) and said in one line; other errors are bugs."""
        try:
            yield
        except Exception as err:
            if not out_of_room(self.root, err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            newest = latest_checkpoint(self.root.parent)
            kept = f"the newest complete one is {newest.path.name}" if newest else "none is complete yet"
            raise UserError(
                f"no space left in {self.root} for checkpoint {tmp.name.removeprefix('.tmp-')}, so it "
                f"was removed ({kept}): free some (older checkpoints there can go; a save needs room "
                f"for one more than checkpoint.keep_last), then `vtc resume {self.root.parent}`"
            ) from err

    def prune(self) -> None:
        for old in list_checkpoints(self.root.parent)[: -self.keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)


def all_did(trainer: L.Trainer, what: str, error: Exception | None) -> None:
    """Every rank learns whether any failed to `what` (one all-reduce of a flag, in place of a
    barrier; a single process asks no one): the one that failed raises its error, the others stop
    with a line that points to it, instead of waiting at the next barrier for the timeout."""
    failed = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
    if error is not None:
        raise error
    if failed:
        raise UserError(
            f"another process of this run failed to {what} (its error is in its output); stopping too"
        )


def files_identity(paths: list[Path]) -> dict:
    """Enough of some files to tell at a resume whether they changed, cheaply (no weights are
    read): their count, total bytes and a digest of their names, sizes and, for small JSON
    files (configs), content."""
    digest = hashlib.sha256()
    total = 0
    for path in sorted(map(Path, paths)):
        size = path.stat().st_size
        total += size
        digest.update(json.dumps([path.name, size]).encode())
        if path.suffix == ".json" and size < 2**20:
            digest.update(path.read_bytes())
    return {"files": len(paths), "bytes": total, "digest": digest.hexdigest()}


def inputs_identity(shards: list[Path], base_dir: str | None) -> dict:
    """What a stage trains on besides its recipe, as a checkpoint records it: the training
    shards and, for a base read from a folder, the files it is loaded from (`is_model_file`:
    configs, weights, tokenizer; a base built from configs has none)."""
    inputs = {"training data": files_identity(shards)}
    if base_dir is not None and Path(base_dir).is_dir():
        loaded = [p for p in Path(base_dir).iterdir() if p.is_file() and is_model_file(p)]
        inputs["base model"] = files_identity(loaded)
    return inputs


def changed_inputs(then: dict | None, now: dict) -> list[str]:
    """What changed between two `inputs_identity` records, one line each ("training data: 1
    file of N bytes then, 2 files of M bytes now"); nothing when `then` is None (a checkpoint
    saved before vtc kept them, or `--force`)."""
    changed = []
    for name, was in (then or {}).items():
        is_ = now.get(name)
        if is_ is None or was["digest"] != is_["digest"]:
            changed.append(f"{name}: {_files(was)} then, {_files(is_) if is_ else 'none'} now")
    return changed


def _files(identity: dict) -> str:
    count = identity["files"]
    return f"{count} file{'s' * (count != 1)} of {identity['bytes']:,} bytes"


def pending_log_row(trainer: L.Trainer, step: int) -> dict | None:
    """The metrics row Lightning logs for this step only after `on_train_batch_end`, where the
    checkpoint is saved: a kill between the save and that write would lose the row, so the
    checkpoint keeps it (None when the step logs nothing). Its CSV step is `step - 1`."""
    every = trainer.log_every_n_steps
    if not every or (step % every and not trainer.should_stop):
        return None
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return {"step": step - 1, "epoch": trainer.current_epoch, **metrics}


def check_finite(module: torch.nn.Module, step: int) -> None:
    """A loss can stay finite while an update makes weights inf/NaN: never save those."""
    bad = [n for n, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise UserError(  # usually a learning rate too high: one line, exit 2
            f"non-finite trainable weights after step {step} (e.g. {bad[0]}); stopping without "
            "saving them, so the newest checkpoint stays the last good one (lower the stage's optim.lr)"
        )


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Global RNG states (torch, CUDA if present, Python, NumPy) as weights_only-loadable values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- recipe drift

# Changing these does not change what the run computes (logging, evaluation, checkpoint
# cadence, where it writes), so a resume accepts it.
DRIFT_IGNORED = (
    "description",
    "output",
    "eval",
    "wandb",
    "checkpoint",
    "trainer.log_every",
    "trainer.threads",
    "trainer.record_samples",
    "data.num_workers",
)


def recipe_drift(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain recipes, ignoring DRIFT_IGNORED."""
    if prefix in DRIFT_IGNORED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{prefix}.{key}" if prefix else str(key)
            out += recipe_drift(old.get(key), new.get(key), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in recipe_drift(a, b, f"{prefix}.{i}")
        ]
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]
