"""The training progress bar (a stage's optimizer steps against its step budget) and the clock
of its throughput."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar counts the batches of the current epoch against the epoch's length,
    so a step-limited stage resumed mid-run reads "Epoch 2/-2 6/6". vtc stages are budgets of
    optimizer steps: this bar names the stage and shows global step / max_steps, starting where a
    resumed run left off, with step/s, ETA and the metrics logged to the bar."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    @property
    def counts_steps(self) -> bool:
        """False without a step budget (vtc stages always set one): then it is Lightning's bar."""
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.counts_steps else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage} · epoch {current_epoch}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # resets the bar to 0 each epoch
        if self.counts_steps and self.progress is not None and self.train_progress_bar_id is not None:
            # start at the steps already done; a reset (not an update) keeps step/s honest
            self.progress.reset(self.train_progress_bar_id, completed=trainer.global_step)

    def _update(self, progress_bar_id, current, visible: bool = True, hard: bool = False) -> None:
        if (
            self.counts_steps
            and progress_bar_id is not None
            and progress_bar_id == self.train_progress_bar_id
        ):
            # the global step, not the batch index: that restarts each epoch and counts micro-batches
            current = self.trainer.global_step
        super()._update(progress_bar_id, current, visible, hard)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger version is the stage name, already shown
        return metrics


class StepClock(Callback):
    """Times a stage: its wall time, and its optimizer steps for its training throughput. The
    step clock starts when the first step ends, so setup and that step's warm-up (data workers
    starting, kernels chosen, memory growing) do not dilute the figure; the periodic checkpoints
    saved in between count, since a run pays for them. `clock`: seconds now
    (time.perf_counter); `before` (steps, seconds timed) and `seconds_before` (wall seconds):
    what an earlier attempt of the stage had, from the checkpoint a resume starts at."""

    def __init__(
        self,
        clock=time.perf_counter,
        before: tuple[int, float] = (0, 0.0),
        seconds_before: float = 0.0,
    ):
        self.clock = clock
        self.before = tuple(before)
        self.seconds_before = seconds_before
        self.started = clock()  # set again when fit starts
        self.first: tuple[int, float] | None = None  # (global step, seconds) when the clock started
        self.last: tuple[int, float | None] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = self.clock()

    def stage_seconds(self) -> float:
        """Wall seconds the stage has trained for, over every attempt (a crash's downtime aside)."""
        return self.seconds_before + self.clock() - self.started

    def on_train_start(self, trainer, pl_module) -> None:
        self.last = (trainer.global_step, None)  # 0, or the step a resumed stage starts after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last[0]:
            return  # a micro-batch that accumulated: no optimizer step ended
        # the rate reads the first and the last step: only they wait for the GPU to finish the
        # step's queued kernels (waiting at every step would stall the next one's); a checkpoint
        # settles the reading it keeps itself (`reread`)
        if (self.first is None or step == trainer.max_steps) and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = self.clock()
        self.first = self.first or (step, now)
        self.last = (step, now)

    def reread(self, trainer) -> None:
        """Read the step just ended again once the GPU has run its queued kernels: the reading a
        checkpoint keeps, which a resume carries on, must not be short by them."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
            self.last = (self.last[0], self.clock())

    def timed(self) -> tuple[int, float]:
        """(optimizer steps, seconds) timed so far, an earlier attempt's included."""
        steps, seconds = self.before
        if self.first is not None:
            steps, seconds = steps + self.last[0] - self.first[0], seconds + self.last[1] - self.first[1]
        return steps, seconds

    def steps_per_second(self) -> float | None:
        """Optimizer steps a second after the first; None when fewer than two steps ran."""
        steps, seconds = self.timed()
        return steps / seconds if steps else None
