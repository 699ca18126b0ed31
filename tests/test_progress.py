"""The training progress bar counts a stage's optimizer steps, across epochs and a resume."""

import lightning as L
import torch

from train.progress import StageProgressBar, StepClock


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # 4 batches an epoch
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)


class Recorded(StageProgressBar):
    """What the bar shows after every batch: (completed, total, description)."""

    def __init__(self, stage):
        super().__init__(stage)
        self.shown = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = next(t for t in self.progress.tasks if t.id == self.train_progress_bar_id)
        self.shown.append((int(task.completed), int(task.total), task.description))


def fit(max_steps, tmp_path, ckpt_path=None, accumulate=1, max_epochs=None, callbacks=()) -> Recorded:
    bar = Recorded("instruct")
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        callbacks=[bar, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Linear(), ckpt_path=ckpt_path)
    return bar


def test_bar_counts_steps_against_the_stage_budget_across_epochs(tmp_path):
    bar = fit(7, tmp_path)  # 4 batches an epoch: epochs 0 and 1
    assert [c for c, _, _ in bar.shown] == [1, 2, 3, 4, 5, 6, 7]
    assert {t for _, t, _ in bar.shown} == {7}
    assert bar.shown[0][2] == "instruct · epoch 0" and bar.shown[-1][2] == "instruct · epoch 1"
    metrics = bar.get_metrics(bar.trainer, None)
    assert "v_num" not in metrics and "train/loss" in metrics


def test_bar_counts_optimizer_steps_under_accumulation(tmp_path):
    bar = fit(3, tmp_path, accumulate=2)  # 2 batches a step
    assert [c for c, _, _ in bar.shown] == [0, 1, 1, 2, 2, 3]


def test_resumed_bar_starts_at_the_checkpoint_step(tmp_path):
    first = fit(5, tmp_path)
    ckpt = tmp_path / "step5.ckpt"
    first.trainer.save_checkpoint(ckpt)
    resumed = fit(7, tmp_path, ckpt_path=str(ckpt))
    assert [c for c, _, _ in resumed.shown] == [6, 7]
    assert {t for _, t, _ in resumed.shown} == {7}


def test_without_a_step_budget_the_bar_counts_each_epochs_batches(tmp_path):
    bar = fit(-1, tmp_path, max_epochs=2)
    assert [c for c, _, _ in bar.shown] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert {t for _, t, _ in bar.shown} == {4}


def test_the_step_clock_times_optimizer_steps_after_the_first(tmp_path):
    """A fake clock that reads the batches done so far: 3 steps of 2 micro-batches end at batches
    2, 4 and 6, so the 2 steps after the first take 4 batch-times (a clock started at the first
    micro-batch would say 3 steps in 5)."""

    class CountBatches(L.Callback):
        count = 0

        def on_train_batch_end(self, *args):
            self.count += 1

    counter = CountBatches()
    clock = StepClock(clock=lambda: counter.count)  # after the counter: reads the batch just ended
    fit(3, tmp_path, accumulate=2, callbacks=[counter, clock])
    assert counter.count == 6 and clock.first == (1, 2) and clock.last == (3, 6)
    assert clock.steps_per_second() == 0.5
    one = StepClock(clock=lambda: 1.0)
    fit(1, tmp_path, callbacks=[one])
    assert one.steps_per_second() is None  # one step: nothing after it to time
    # a resumed stage carries on what the attempt before timed (from its checkpoint)
    counter.count = 0
    resumed = StepClock(clock=lambda: counter.count, before=(10, 6.0))
    fit(3, tmp_path, callbacks=[counter, resumed])
    assert resumed.timed() == (12, 8) and resumed.steps_per_second() == 12 / 8


def test_the_step_clock_waits_for_the_gpu_only_at_the_readings_that_count(monkeypatch):
    """On a GPU a reading waits for the queued kernels only where it is kept: the first step, the
    last, and every checkpoint's step (the checkpoint rereads it: a resume carries that reading
    on); not at the others."""
    from types import SimpleNamespace

    import torch

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waited.append(trainer.global_step))
    trainer = SimpleNamespace(
        global_step=0, max_steps=12, strategy=SimpleNamespace(root_device=torch.device("cuda", 0))
    )
    clock = StepClock(clock=lambda: float(trainer.global_step))
    clock.on_train_start(trainer, None)
    for step in range(1, 13):
        trainer.global_step = step
        clock.on_train_batch_end(trainer, None, None, None, step - 1)
        if step % 5 == 0:  # a checkpoint every 5 steps, as PeriodicCheckpoint.save does
            clock.reread(trainer)
    assert waited == [1, 5, 10, 12]
    assert clock.timed() == (11, 11.0)
