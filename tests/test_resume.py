"""Resume after a crash: exact data position, bit-identical weights, atomic saves, drift refusal."""

import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.errors import UserError
from data.loader import ResumableLoader
from data.synth import FAMILIES
from tests.conftest import smoke_train_cmd
from train.checkpoint import TrainablesCheckpointIO, latest_checkpoint, list_checkpoints, recipe_drift
from train.cli import main
from train.signals import STOP_SIGNALS

# Stage "instruct": 96 samples / batch 8 = 12 batches per epoch, 30 steps = 2.5 epochs, so a
# kill after step 12 lands in the second epoch, past the point where a naive resume re-reads data.
SHORT = [
    "data.synthetic.train=96",
    "stages.0.steps=4",
    "stages.1.steps=30",
    "trainer.threads=1",
]


def train_cmd(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return smoke_train_cmd(run_dir, data_dir, *SHORT, *extra)


def own_env() -> dict:
    """The environment without WANDB_SERVICE: an in-process wandb run of another test exports
    its service there, and the runs here must not share it (a killed run's id would stay in use)."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=own_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def vtc_here(cmd: list[str]) -> str:
    """`vtc` run in this process as `run_ok` runs `cmd` in a new one, for what trains or resumes
    after a run killed in its own process (a new process costs ~7 s of imports, most of these
    tests' time): its stdout; it must succeed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(cmd[3:])  # [python, -m, train.cli, COMMAND, ...]
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def resume_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.cli", "resume", str(run_dir), *extra]


def train_killed_by(
    patch: str, run_dir: Path, data_dir: Path, *extra: str, new_session: bool = False
) -> subprocess.CompletedProcess:
    """Train in a subprocess whose `train` modules `patch` first changed (a script that sees
    `os`, `signal`, `checkpoint` and `cli`), e.g. to SIGKILL itself at a chosen point; in a
    process group of its own with `new_session` (one it may signal whole, as a scheduler does)."""
    script = f"import os, signal, sys\nfrom train import checkpoint, cli\n{patch}sys.exit(cli.main(sys.argv[1:]))\n"
    cmd = train_cmd(run_dir, data_dir, *extra)
    return subprocess.run(
        [sys.executable, "-c", script, *cmd[3:]],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=new_session,
    )


def logged_steps(run_dir: Path, stage: str = "instruct") -> list[int]:
    """The steps of the stage's metrics.csv rows, in file order."""
    rows = (run_dir / "logs" / stage / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[1]) for line in rows]


def weights_bytes(run_dir: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(str(run_dir / "trainable.safetensors")).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The reference: the same recipe trained without interruption (keeping 2 checkpoints)."""
    root = tmp_path_factory.mktemp("resume")
    run_dir, data_dir = root / "reference", root / "data"
    vtc_here(train_cmd(run_dir, data_dir, "checkpoint.every=5", "checkpoint.keep_last=2"))
    return run_dir, data_dir


def test_loader_continues_exactly_where_it_stopped():
    data = list(range(50))
    full = ResumableLoader(data, batch_size=4, seed=3)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]
    first = ResumableLoader(data, batch_size=4, seed=3)
    first.sampler.set_epoch(2)
    taken = []
    for batch in first:
        taken.append(batch.tolist())
        if len(taken) == 5:
            break
    state = first.state_dict()
    resumed = ResumableLoader(data, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert state == {"epoch": 2, "batches_taken": 5}
    assert taken + [b.tolist() for b in resumed] == expected
    assert len(expected) == 12  # 50 // 4, the tail dropped
    # another epoch is another order; ranks split an epoch into disjoint equal shares
    other = ResumableLoader(data, batch_size=4, seed=3)
    other.sampler.set_epoch(3)
    assert [b.tolist() for b in other] != expected
    shares = [
        sum((b.tolist() for b in ResumableLoader(data, 5, seed=3, rank=r, world=2)), []) for r in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) == 25 and not set(shares[0]) & set(shares[1])


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(uninterrupted, tmp_path):
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "killed"
    kill_after = random.Random().randint(13, 21)  # the next even (saved) step is inside epoch 2
    wandb = ["wandb.enabled=true", "wandb.mode=offline"]  # logging is not part of the drift check
    cmd = train_cmd(run_dir, data_dir, "checkpoint.every=2", "checkpoint.keep_last=2", *wandb)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=own_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        newest = latest_checkpoint(run_dir)
        if newest and newest.stage == "instruct" and newest.step >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "trainable.safetensors").exists()
    newest = latest_checkpoint(run_dir)
    assert newest.step % 12 != 0, "the resume point should be mid-epoch"
    ids = json.loads((run_dir / "wandb-ids.json").read_text())
    out = run_ok(train_cmd(run_dir, data_dir, *wandb, "--resume", "auto"))
    assert f"resuming from {newest.path}" in out.stdout
    assert weights_bytes(run_dir) == weights_bytes(reference)
    # the resumed stage logged into the same wandb run as before the kill
    assert json.loads((run_dir / "wandb-ids.json").read_text()) == ids
    assert "`resume` will be ignored" not in out.stderr  # offline, the kept id alone does it
    instruct_runs = list((run_dir / "wandb").glob(f"offline-run-*-{ids['instruct']}"))
    assert len(instruct_runs) == 2, instruct_runs
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["vision", "instruct"]
    assert meta["stages"][1]["resumed_from"] == newest.path.name
    # the stage's wall time counts the training before the kill, which its checkpoint kept
    assert newest.stage_seconds > 0 and meta["stages"][1]["seconds"] >= newest.stage_seconds
    # and its throughput clock had timed every step after the first up to the saved one
    assert newest.timed[0] == newest.step - 1 and newest.timed[1] > 0
    assert meta["stages"][1]["samples_per_second"] > 0
    # the metrics file continues: one row per step, as in the uninterrupted run
    assert logged_steps(run_dir) == list(range(30))


def test_ctrl_c_says_where_to_resume_and_the_resume_is_exact(uninterrupted, tmp_path):
    """Ctrl-C (a real SIGINT) mid-stage: Lightning shuts down, vtc names the newest checkpoint
    and the command that goes on from it, and that resume ends bit-identical to the run that
    was never interrupted. Ctrl-C outside training is no traceback either."""
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "interrupted"
    patch = (
        "end = checkpoint.PeriodicCheckpoint.on_train_batch_end\n"
        "def ctrl_c_at_17(self, trainer, *args):\n"
        "    end(self, trainer, *args)\n"
        "    if self.stage_name == 'instruct' and trainer.global_step == 17:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "checkpoint.PeriodicCheckpoint.on_train_batch_end = ctrl_c_at_17\n"
    )
    out = train_killed_by(patch, run_dir, data_dir, "checkpoint.every=5", "checkpoint.keep_last=2")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (
        "[vtc] interrupted at step 17 of stage 'instruct'; the newest checkpoint is "
        f"stage1-instruct-step0000015 (stage 'instruct', step 15); `vtc resume {run_dir}` goes on"
    ) in out.stderr
    assert not (run_dir / "trainable.safetensors").exists()
    resumed = vtc_here(resume_cmd(run_dir))
    assert "resuming from" in resumed and "stage1-instruct-step0000015" in resumed
    assert weights_bytes(run_dir) == weights_bytes(reference)
    # a finished run: nothing to do, nothing written (a job script may resume whatever it finds)
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = vtc_here(resume_cmd(run_dir))
    assert (
        "finished training at stage1-instruct-step0000030 and was evaluated with these eval settings; nothing to do"
        in again
    )
    assert "held-out accuracy" in again  # what it recorded
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == written
    # with other eval settings it evaluates again, and trains nothing
    again = vtc_here(resume_cmd(run_dir, "eval.limit=2"))
    assert "finished training at stage1-instruct-step0000030: nothing left to train; evaluating" in again
    assert json.loads((run_dir / "metrics.json").read_text())["count"] == 2 * len(FAMILIES)
    assert weights_bytes(run_dir) == weights_bytes(reference)

    patch = "from train import evaluate\nevaluate.evaluate = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)\n"
    script = f"import os, signal, sys\nfrom train import cli\n{patch}sys.exit(cli.main(sys.argv[1:]))\n"
    out = subprocess.run(
        [sys.executable, "-c", script, "evaluate", str(run_dir), "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 130 and out.stderr.strip().endswith("vtc: interrupted"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def train_stopped_by_a_signal(
    monkeypatch, overrides: list[str], step: int | None, signum=signal.SIGTERM
) -> int:
    """Train tiny/smoke with `overrides` in this process, sending it `signum` once stage
    'instruct' has saved `step` (None: its last step); the exit status it stopped with."""
    from train import checkpoint
    from train.recipe import load_recipe
    from train.run import run_recipe

    saving = checkpoint.PeriodicCheckpoint.save

    def save_then_signal(self, trainer, saved_step, stage_done):
        final = saving(self, trainer, saved_step, stage_done)
        if self.stage_name == "instruct" and (stage_done if step is None else saved_step == step):
            os.kill(os.getpid(), signum)
        return final

    monkeypatch.setattr(checkpoint.PeriodicCheckpoint, "save", save_then_signal)
    try:
        with pytest.raises(SystemExit) as stopped:
            run_recipe(load_recipe("tiny/smoke", overrides))
    finally:
        monkeypatch.setattr(checkpoint.PeriodicCheckpoint, "save", saving)
    return stopped.value.code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_as_the_last_step_is_saved_stops_before_the_final_weights(
    tmp_path, monkeypatch, capsys, signum
):
    """A stop signal (SIGTERM, or SLURM's early warning SIGUSR1) that comes while the last
    step's checkpoint is written is not dropped: the run stops (128 + the signal) before its
    final weights and evaluation, and the resume finishes it. Outside the run, the handlers that
    were there before are back."""
    from train.recipe import load_recipe
    from train.run import run_recipe

    run_dir = tmp_path / "run"
    overrides = [f"output={run_dir}", f"data.cache_dir={tmp_path / 'data'}", "stages.1.steps=4"]
    before = [signal.getsignal(s) for s in STOP_SIGNALS]
    assert train_stopped_by_a_signal(monkeypatch, overrides, None, signum) == 128 + signum
    name = signal.Signals(signum).name
    assert f"terminated ({name}) as training ended; `vtc resume {run_dir}`" in capsys.readouterr().err
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == before
    assert not (run_dir / "trainable.safetensors").exists()
    run_recipe(load_recipe("tiny/smoke", overrides), resume="auto")
    assert (run_dir / "trainable.safetensors").is_file() and (run_dir / "metrics.json").is_file()


class _WorkerHandlers(torch.utils.data.Dataset):
    """What a loader worker does on each stop signal."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return [signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS]


def test_a_stage_starts_with_vtcs_stop_signal_handler_never_lightnings(tmp_path, monkeypatch):
    """From the moment each stage's Trainer starts fitting, a stop signal goes to the run's
    Termination, not to Lightning's handler: that one broadcasts from inside itself under DDP,
    so a rank signalled alone between its registration and the stage's first hook (a stop as a
    stage starts) waited for the others forever (`tests/test_ddp.py -k one_rank` hung so once)."""
    import lightning as L

    from train.checkpoint import Termination
    from train.recipe import load_recipe
    from train.run import run_recipe

    seen = []
    run_stage = L.Trainer._run_stage

    def spy(self):  # Lightning registers its handlers just before this
        seen.append(signal.getsignal(signal.SIGTERM))
        return run_stage(self)

    monkeypatch.setattr(L.Trainer, "_run_stage", spy)
    overrides = [f"output={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}", "eval.limit=1"]
    run_recipe(load_recipe("tiny/smoke", [*overrides, "stages.0.steps=1", "stages.1.steps=1"]))
    assert len(seen) == 2 and all(getattr(handler, "__func__", None) is Termination.note for handler in seen)


def test_loader_workers_leave_the_stop_signals_to_the_training_process():
    """A scheduler signals every process of a job (SIGUSR1 as SLURM's early warning, then
    SIGTERM): vtc's loader workers ignore both, so the training process saves first rather than
    the run dying of a DataLoader error; the run's own handlers are untouched."""
    from functools import partial

    from train.datamodule import init_worker

    loader = torch.utils.data.DataLoader(
        _WorkerHandlers(), batch_size=None, num_workers=2, worker_init_fn=partial(init_worker, rank=0)
    )
    assert list(loader) == [[True, True], [True, True]]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_resume_over_changed_training_shards_or_base_is_refused(tmp_path, monkeypatch):
    """A checkpoint records what its stage trains on besides the recipe: the training shards and
    the base model's files (names and sizes, configs by content; no weights are read). Resumed
    over others, the loader's position would be a place in another order of samples, and the
    trained weights would sit on other frozen ones: refused, naming what changed, unless --force."""
    import shutil

    from models.pretrained import shipped_path
    from train.recipe import load_recipe
    from train.run import run_recipe

    run_dir, data_dir, base = tmp_path / "run", tmp_path / "data", tmp_path / "base"
    shutil.copytree(shipped_path("tiny-llava"), base)  # a base read from a folder, as a 7B's is
    (base / "provenance.json").unlink()  # not a shipped base, whose files vtc checks itself
    overrides = [
        f"output={run_dir}",
        f"data.cache_dir={data_dir}",
        f"model.base={base}",
        "stages.1.steps=6",
        "checkpoint.every=2",
    ]
    train_stopped_by_a_signal(monkeypatch, overrides, 2)
    assert latest_checkpoint(run_dir).step == 3  # the step under way when SIGTERM came
    (shard,) = data_dir.rglob("train-*/*.tar")  # the synthetic training split, one shard
    shutil.copy(shard, shard.with_name("shard-000001.tar"))  # as `vtc data convert --append` adds one
    size = shard.stat().st_size
    config = (base / "config.json").read_text()
    assert '"rms_norm_eps": 1e-06' in config  # changed to one as long: only its content tells
    (base / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06'))
    with pytest.raises(UserError) as refused:
        run_recipe(load_recipe("tiny/smoke", overrides), resume="auto")
    lines = str(refused.value).splitlines()
    assert (
        lines[0]
        == f"refusing to resume {run_dir}: what it trains on changed since stage1-instruct-step0000003"
    )
    assert lines[1] == f"  training data: 1 file of {size:,} bytes then, 2 files of {2 * size:,} bytes now"
    assert lines[2].startswith("  base model: 6 files of ") and "pass --force to resume anyway" in lines[-1]
    then, now = (
        int(side.split(" of ")[1].split(" bytes")[0].replace(",", "")) for side in lines[2].split(", ")
    )
    assert then == now
    run_recipe(load_recipe("tiny/smoke", overrides), resume="auto", force=True)
    assert (run_dir / "trainable.safetensors").is_file()


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "state.pt"])
def test_a_checkpoint_damaged_after_its_save_is_named_with_the_one_before(tmp_path, monkeypatch, damaged):
    """Saves are atomic, so a checkpoint that cannot be read back was damaged afterwards (a
    partial copy, a disk error): the resume says which, and how to go on from the one before."""
    from train.recipe import load_recipe
    from train.run import run_recipe

    run_dir = tmp_path / "run"
    overrides = [f"output={run_dir}", f"data.cache_dir={tmp_path / 'data'}", "checkpoint.every=2"]
    train_stopped_by_a_signal(monkeypatch, overrides, 4)
    *_, before, newest = list_checkpoints(run_dir)
    assert (before.step, newest.step) == (4, 5)
    with (newest.path / damaged).open("r+b") as file:
        file.truncate(100)
    with pytest.raises(UserError) as unreadable:
        run_recipe(load_recipe("tiny/smoke", overrides), resume="auto")
    said = str(unreadable.value)
    assert said.startswith(f"checkpoint {newest.path} cannot be read (") and "Traceback" not in said
    assert said.endswith(
        "it was damaged after it was saved (a partial copy, a disk error); "
        f"`vtc train {run_dir / 'recipe.yaml'} --resume {before.path}` resumes from the one before it, "
        "or delete it"
    )
    run_recipe(load_recipe(run_dir / "recipe.yaml"), resume=str(before.path))
    assert (run_dir / "trainable.safetensors").is_file()


def test_a_loader_worker_killed_for_memory_ends_the_run_in_one_line(tmp_path):
    """The kernel's out-of-memory killer takes a loader worker (here SIGKILL after step 3 of
    the stage, saved): one line says what happened and what to lower, exit 2, and the resume
    goes on from the newest checkpoint."""
    patch = (
        "import multiprocessing\n"
        "end = checkpoint.PeriodicCheckpoint.on_train_batch_end\n"
        "def kill_a_worker(self, trainer, *args):\n"
        "    end(self, trainer, *args)\n"
        "    if self.stage_name == 'instruct' and trainer.global_step == 3:\n"
        "        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)\n"
        "checkpoint.PeriodicCheckpoint.on_train_batch_end = kill_a_worker\n"
    )
    run_dir = tmp_path / "run"
    extra = ("data.num_workers=2", "checkpoint.every=3", "stages.1.steps=8")
    out = train_killed_by(patch, run_dir, tmp_path / "data", *extra)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    said = out.stderr.strip().splitlines()[-2:]
    assert said[0].startswith(
        "vtc: error: DataLoader worker (pid"
    )  # "... exited unexpectedly" or "is killed"
    assert said[1].startswith(
        "  a data loader worker died, most often killed by the kernel when memory ran out"
    )
    assert latest_checkpoint(run_dir).step == 3
    vtc_here(resume_cmd(run_dir))


def test_a_save_that_fills_the_disk_is_removed_and_said_in_one_line(tmp_path, monkeypatch):
    """The third save runs out of space half-way: it is removed at once (it holds the space a
    user has to free), the error names the newest complete checkpoint, and the resume, once
    there is room, goes on from it."""
    import errno

    from train import checkpoint
    from train.recipe import load_recipe
    from train.run import run_recipe

    writing, calls = checkpoint.TrainablesCheckpointIO._write, []

    def disk_fills(self, ckpt, folder):
        calls.append(folder)
        if len(calls) == 3:
            os.makedirs(folder, exist_ok=True)
            Path(folder, "trainable.safetensors").write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return writing(self, ckpt, folder)

    monkeypatch.setattr(checkpoint.TrainablesCheckpointIO, "_write", disk_fills)
    run_dir = tmp_path / "run"
    overrides = [f"output={run_dir}", f"data.cache_dir={tmp_path / 'data'}", "checkpoint.every=3"]
    with pytest.raises(UserError) as full:
        run_recipe(load_recipe("tiny/smoke", overrides))
    assert str(full.value).startswith(
        f"no space left in {run_dir / 'ckpt'} for checkpoint stage1-instruct-step0000003, so it was "
        "removed (the newest complete one is stage0-vision-step0000004)"
    )
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == [
        "stage0-vision-step0000003",
        "stage0-vision-step0000004",
    ]
    monkeypatch.setattr(checkpoint.TrainablesCheckpointIO, "_write", writing)
    run_recipe(load_recipe("tiny/smoke", overrides), resume="auto")
    assert (run_dir / "trainable.safetensors").is_file()


def test_sigterm_to_the_whole_job_saves_the_step_under_way_then_stops(uninterrupted, tmp_path):
    """SIGTERM (a scheduler's time limit, a preemption) reaches every process of the job, loader
    workers too, and most often inside a gradient-accumulation window: the workers live on, the
    window is finished and saved, the run exits 143 without its final weights (Lightning's own
    stop is a SystemExit with no status, which reports success), and the resume ends as the
    uninterrupted run did. (Step 12 is also an epoch's last: 96 samples are 6 steps of 2 × 8.)"""
    _, data_dir = uninterrupted
    window = (
        "stages.1.global_batch_size=16",
        "data.num_workers=2",
        "stages.1.steps=14",
        "checkpoint.every=5",
    )
    reference = tmp_path / "reference"
    vtc_here(train_cmd(reference, data_dir, *window))
    run_dir = tmp_path / "terminated"
    patch = (
        "end, seen = checkpoint.PeriodicCheckpoint.on_train_batch_end, []\n"
        "def sigterm_mid_window(self, trainer, *args):\n"
        "    end(self, trainer, *args)\n"
        "    if self.stage_name == 'instruct' and trainer.global_step == 11:\n"
        "        seen.append(1)\n"
        "        if len(seen) == 2:  # the first micro-batch of step 12's window\n"
        "            os.killpg(os.getpgid(0), signal.SIGTERM)\n"
        "checkpoint.PeriodicCheckpoint.on_train_batch_end = sigterm_mid_window\n"
    )
    out = train_killed_by(patch, run_dir, data_dir, *window, new_session=True)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert (
        "[vtc] terminated (SIGTERM) at step 12 of stage 'instruct'; saved as "
        f"stage1-instruct-step0000012, so nothing is lost; `vtc resume {run_dir}` goes on"
    ) in out.stderr
    assert "Traceback" not in out.stderr
    assert [c.step for c in list_checkpoints(run_dir)] == [10, 12]
    assert not (run_dir / "trainable.safetensors").exists()
    vtc_here(resume_cmd(run_dir))
    assert weights_bytes(run_dir) == weights_bytes(reference)
    assert logged_steps(run_dir) == list(range(14))


@pytest.mark.slow
def test_kill_right_after_a_save_keeps_that_steps_metrics_row(uninterrupted, tmp_path):
    """Lightning writes a step's metrics row after `on_train_batch_end`, where the checkpoint is
    saved: a kill in between must not leave a hole in metrics.csv once the run resumes."""
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "killed-after-save"
    patch = (
        "original = checkpoint.PeriodicCheckpoint.save\n"
        "def dying(self, trainer, step, stage_done):\n"
        "    final = original(self, trainer, step, stage_done)\n"
        "    if self.stage_name == 'instruct' and step == 16:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return final\n"
        "checkpoint.PeriodicCheckpoint.save = dying\n"
    )
    out = train_killed_by(patch, run_dir, data_dir, "checkpoint.every=2", "checkpoint.keep_last=2")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(15)), "the kill should come before step 15's row is written"
    vtc_here(train_cmd(run_dir, data_dir, "--resume", "auto"))
    assert logged_steps(run_dir) == list(range(30))
    assert weights_bytes(run_dir) == weights_bytes(reference)
    # the filled-in row holds what the uninterrupted run logged at that step
    resumed, uninterrupted_rows = (
        list(csv.DictReader((d / "logs/instruct/metrics.csv").open())) for d in (run_dir, reference)
    )
    assert resumed[15] == uninterrupted_rows[15]


@pytest.mark.slow
def test_a_bf16_mixed_run_resumes_exactly_with_its_float32_master_weights(tmp_path):
    """A bfloat16 model under `bf16-mixed` steps float32 master weights (`train/precision.py`);
    they are in each checkpoint, so a run killed after a save goes on to the weights of the run
    that was never killed (from the rounded bfloat16 weights alone it would not)."""
    half = [
        "model.dtype=bfloat16",
        "trainer.precision=bf16-mixed",
        "stages.1.optim.lr=2e-4",
        "stages.1.steps=16",
    ]
    half += ["checkpoint.every=4", "checkpoint.keep_last=2", "eval.after_training=false"]
    data_dir = tmp_path / "data"
    reference = tmp_path / "reference"
    vtc_here(train_cmd(reference, data_dir, *half))
    patch = (
        "original = checkpoint.PeriodicCheckpoint.save\n"
        "def dying(self, trainer, step, stage_done):\n"
        "    final = original(self, trainer, step, stage_done)\n"
        "    if self.stage_name == 'instruct' and step == 12:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return final\n"
        "checkpoint.PeriodicCheckpoint.save = dying\n"
    )
    run_dir = tmp_path / "killed"
    out = train_killed_by(patch, run_dir, data_dir, *half)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    state = torch.load(latest_checkpoint(run_dir).path / "state.pt", weights_only=True)
    assert "masters" in state["optimizer_states"][0]
    vtc_here(train_cmd(run_dir, data_dir, *half, "--resume", "auto"))
    weights = load_file(str(run_dir / "trainable.safetensors"))
    expected = load_file(str(reference / "trainable.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "killed-in-save"
    # The third save dies after writing its weights, before its training state.
    patch = (
        "original, calls = checkpoint.TrainablesCheckpointIO.save_checkpoint, []\n"
        "def dying(self, ckpt, path, storage_options=None):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 3:\n"
        "        from safetensors.torch import save_file\n"
        "        os.makedirs(path, exist_ok=True)\n"
        "        save_file({'x': __import__('torch').zeros(1)}, os.path.join(path, 'trainable.safetensors'))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, ckpt, path, storage_options)\n"
        "checkpoint.TrainablesCheckpointIO.save_checkpoint = dying\n"
    )
    out = train_killed_by(patch, run_dir, data_dir, "checkpoint.every=3", "checkpoint.keep_last=5")
    assert out.returncode == -signal.SIGKILL
    found = list_checkpoints(run_dir)
    # vision ends at step 4 (saved: 3, 4), instruct's step 3 died mid-save
    assert [(c.stage, c.step) for c in found] == [("vision", 3), ("vision", 4)]
    assert list((run_dir / "ckpt").glob(".tmp-*")), "the partial save should be left where it died"
    state = TrainablesCheckpointIO().load_checkpoint(found[-1].path)
    assert state["global_step"] == 4 and all(torch.isfinite(t).all() for t in state["state_dict"].values())
    vtc_here(resume_cmd(run_dir))
    assert not list((run_dir / "ckpt").glob(".tmp-*"))
    assert weights_bytes(run_dir) == weights_bytes(reference)


@pytest.mark.slow
def test_finished_run_keeps_the_newest_checkpoints_and_refuses_silent_restart(uninterrupted):
    reference, data_dir = uninterrupted
    kept = list_checkpoints(reference)
    assert [(c.stage, c.step, c.stage_done) for c in kept] == [
        ("instruct", 25, False),
        ("instruct", 30, True),
    ]
    from train.recipe import load_recipe
    from train.run import resume_point

    recipe = load_recipe("tiny/smoke", [f"output={reference}", f"data.cache_dir={data_dir}", *SHORT])
    with pytest.raises(UserError, match="--resume auto"):
        resume_point(recipe, reference, None, force=False, restart=False)
    assert resume_point(recipe, reference, "auto", force=False, restart=False) == kept[-1]
    changed = load_recipe(
        "tiny/smoke",
        [
            f"output={reference}",
            f"data.cache_dir={data_dir}",
            *SHORT,
            "stages.1.optim.lr=0.1",
            "eval.limit=2",
        ],
    )
    with pytest.raises(UserError, match=r"stages\.1\.optim\.lr: 0\.003 → 0\.1") as err:
        resume_point(changed, reference, "auto", force=False, restart=False)
    assert "eval" not in str(err.value)  # evaluation settings do not change the training
    assert resume_point(changed, reference, "auto", force=True, restart=False) == kept[-1]


def test_a_restart_or_an_earlier_resume_leaves_nothing_of_the_history_it_replaces(
    tmp_path, monkeypatch, capsys
):
    """`--restart`, or `--resume` from a checkpoint older than the newest, replaces a history:
    what that history left (newer checkpoints, the final weights, meta, metrics, reports; on a
    restart the logs too) is removed first, so that when the new history crashes the folder is
    an unfinished run, not the former run's weights beside the new checkpoints."""
    from train import checkpoint
    from train.checkpoint import unfinished_run
    from train.recipe import load_recipe
    from train.run import run_recipe

    run_dir = tmp_path / "run"
    recipe = load_recipe(
        "tiny/smoke",
        [
            f"output={run_dir}",
            f"data.cache_dir={tmp_path / 'data'}",
            "checkpoint.every=4",
            "checkpoint.keep_last=10",
        ],
    )
    run_recipe(recipe)
    (run_dir / "eval").mkdir()  # a checkpoint's report (`vtc evaluate RUN/ckpt/...`)
    saved = {(c.stage, c.step): c.path for c in list_checkpoints(run_dir)}
    assert ("instruct", 16) in saved and (run_dir / "trainable.safetensors").is_file()

    end = checkpoint.PeriodicCheckpoint.on_train_batch_end

    def crash_at_10(self, trainer, *args):
        end(self, trainer, *args)
        if self.stage_name == "instruct" and trainer.global_step == 10:
            raise RuntimeError("the new history crashed")

    monkeypatch.setattr(checkpoint.PeriodicCheckpoint, "on_train_batch_end", crash_at_10)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="crashed"):
        run_recipe(recipe, resume=str(saved[("instruct", 8)]))
    removed = "stage1-instruct-step0000008: removed the former history's 2 checkpoint(s), trainable.safetensors, hf, meta.json, metrics.json"
    assert removed in capsys.readouterr().out
    assert [(c.stage, c.step) for c in list_checkpoints(run_dir)] == [
        ("vision", 4),
        ("instruct", 4),
        ("instruct", 8),
    ]
    assert "has not finished" in unfinished_run(run_dir, "evaluate {}")
    assert (run_dir / "logs" / "instruct").is_dir() and (run_dir / "eval").is_dir()  # kept: same history

    with pytest.raises(RuntimeError, match="crashed"):
        run_recipe(recipe, restart=True)
    assert "--restart: removed the former history's 3 checkpoint(s), logs, eval" in capsys.readouterr().out
    assert [(c.stage, c.step) for c in list_checkpoints(run_dir)] == [
        ("vision", 4),
        ("instruct", 4),
        ("instruct", 8),
    ]
    assert not (run_dir / "eval").exists() and not (run_dir / "trainable.safetensors").exists()
    # the instruct log holds the new history's rows only (up to its crash), not the former 16
    steps = logged_steps(run_dir)
    assert steps == list(range(len(steps))) and 0 < len(steps) <= 10


def test_newest_checkpoint_is_chosen_by_stage_and_step_not_name(tmp_path):
    def fake(name: str, stage_index: int, step: int, complete: bool = True):
        path = tmp_path / "ckpt" / name
        path.mkdir(parents=True)
        if complete:
            info = {"stage_index": stage_index, "stage": f"s{stage_index}", "step": step, "stage_done": False}
            (path / "info.json").write_text(json.dumps(info))

    fake("stage1-b-step99", 1, 99)
    fake("stage1-b-step100", 1, 100)
    fake("stage0-a-step500", 0, 500)
    fake("stage9-z-step999", 9, 999, complete=False)  # no info.json: a save that never finished
    fake(".tmp-stage1-b-step200", 1, 200)  # hidden: never picked
    assert [c.step for c in list_checkpoints(tmp_path)] == [500, 99, 100]
    assert latest_checkpoint(tmp_path).path.name == "stage1-b-step100"


def test_recipe_drift_names_what_changed():
    old = {
        "seed": 0,
        "stages": [{"batch_size": 8}],
        "trainer": {"threads": 1, "devices": 1},
        "eval": {"limit": 5},
    }
    new = {
        "seed": 1,
        "stages": [{"batch_size": 4}],
        "trainer": {"threads": 2, "devices": 1},
        "eval": {"limit": 9},
    }
    assert recipe_drift(old, new) == ["seed: 0 → 1", "stages.0.batch_size: 8 → 4"]
    assert recipe_drift(old, {**old, "stages": []}) == ["stages: [{'batch_size': 8}] → []"]


def nan_losses(monkeypatch, when) -> None:
    """Make the training loss NaN on the forward calls (counted from 1) for which `when` holds."""
    from models.llava import VtcLlava

    forward, calls = VtcLlava.forward, []

    def maybe_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if self.training and out.loss is not None and when(len(calls)):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VtcLlava, "forward", maybe_nan)


def skipping_recipe(tmp_path, run_dir, *overrides):
    """The smoke recipe with trainer.nonfinite_loss=skip."""
    from train.recipe import load_recipe

    base = [f"output={run_dir}", f"data.cache_dir={tmp_path / 'data'}", "trainer.nonfinite_loss=skip"]
    return load_recipe("tiny/smoke", [*base, *overrides])


@pytest.mark.slow
def test_nonfinite_loss_skip_leaves_out_the_batch(tmp_path, monkeypatch):
    """With trainer.nonfinite_loss=skip a NaN loss costs that batch only: the weights do not
    move on it (the step count and LR schedule do), and the skipped steps are listed."""
    from train.run import run_recipe

    nan_losses(monkeypatch, lambda call: call in (3, 6))
    run_dir = tmp_path / "skip"
    run_recipe(
        skipping_recipe(tmp_path, run_dir, "checkpoint.every=1", "checkpoint.keep_last=100", *SHORT[:2])
    )
    instruct = json.loads((run_dir / "meta.json").read_text())["stages"][1]
    # forward calls 3 and 6 are steps 2 and 5 (the skipped batch still takes its step number)
    assert instruct["steps"] == 16 and instruct["nonfinite_skipped_steps"] == [2, 5]
    saved = {c.step: c.path for c in list_checkpoints(run_dir) if c.stage == "instruct"}
    weights = {s: load_file(str(saved[s] / "trainable.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # skipped: no update
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # a real step
    assert all(torch.isfinite(t).all() for t in load_file(str(run_dir / "trainable.safetensors")).values())


def test_a_run_of_nonfinite_losses_stops_even_when_skipping(tmp_path, monkeypatch):
    """Skipping is for the odd bad batch: when every batch's loss is non-finite the run stops
    with a clear error after NONFINITE_RUN of them instead of training on to the end."""
    from train.module import NONFINITE_RUN
    from train.run import run_recipe

    nan_losses(monkeypatch, lambda call: True)
    recipe = skipping_recipe(tmp_path, tmp_path / "diverged", "stages.1.steps=30", *SHORT[:1])
    with pytest.raises(UserError, match=f"{NONFINITE_RUN} non-finite losses in a row"):
        run_recipe(recipe)


@pytest.mark.slow
def test_two_process_ddp_resume_matches_the_uninterrupted_run(tmp_path):
    data_dir = tmp_path / "data"
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "stages.1.steps=10"]
    ddp += ["stages.1.train.llm=lora", "checkpoint.every=4", "checkpoint.keep_last=10"]
    # 2 ranks x batch 8 x 2 accumulated = 32: 3 steps per epoch, so step 4 is mid-epoch
    ddp += ["stages.1.global_batch_size=32"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(train_cmd(reference, data_dir, *ddp), capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # a copy of it made to look like a run that died after its step-4 checkpoint of stage
    # "instruct" (training it again for that would take as long as the reference did)
    shutil.copytree(reference, resumed)
    for ckpt in list_checkpoints(resumed):
        if ckpt.stage == "instruct" and ckpt.step > 4:
            subprocess.run(["rm", "-rf", str(ckpt.path)], check=True)
    for name in ("trainable.safetensors", "meta.json", "metrics.json"):
        (resumed / name).unlink()
    out = subprocess.run(
        train_cmd(resumed, data_dir, *ddp, "--resume", "auto"), capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 4" in out.stdout
    assert weights_bytes(resumed) == weights_bytes(reference)


def test_a_stage_shorter_than_log_every_still_logs(tmp_path, monkeypatch):
    """trainer.log_every above a stage's steps used to leave that stage without a metrics.csv.
    (And `trainer.threads` holds for the run only: a run started from Python used to leave its
    caller's process on the recipe's thread count.)"""
    from train import run
    from train.recipe import load_recipe
    from train.run import run_recipe

    threads, train_stage = [], run.train_stage

    def counting_threads(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return train_stage(*args, **kwargs)

    monkeypatch.setattr(run, "train_stage", counting_threads)
    torch.set_num_threads(2)
    run_dir = tmp_path / "short"
    overrides = [f"output={run_dir}", f"data.cache_dir={tmp_path / 'data'}", "trainer.log_every=50"]
    run_recipe(load_recipe("tiny/smoke", [*overrides, *SHORT[:2], "stages.1.steps=3", "trainer.threads=1"]))
    assert threads == [1, 1] and torch.get_num_threads() == 2
    for stage, last in (("vision", 3), ("instruct", 2)):
        steps = [
            line.split(",")[1] for line in (run_dir / "logs" / stage / "metrics.csv").read_text().splitlines()
        ]
        assert steps[-1] == str(last), (stage, steps)


def fake_checkpoint(folder: Path, files: list[str], saved_by: int | None = None):
    """A checkpoint folder holding files of these names (relative paths; `.pt` ones empty zip
    archives, as torch writes them), saved by `saved_by` processes (None: not recorded)."""
    import zipfile

    from train.checkpoint import CheckpointInfo

    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".pt"):
            zipfile.ZipFile(folder / name, "w").close()
        else:
            (folder / name).touch()
    return CheckpointInfo(folder, 1, "instruct", 4, False, saved_by=saved_by)


ZERO_2_FILES = [f"checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
ZERO_2_FILES += ["checkpoint/mp_rank_00_model_states.pt"]
ZERO_3_FILES = [
    f"checkpoint/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")
]


@pytest.mark.parametrize(
    "files,strategy,devices,refused",
    [
        (["trainable.safetensors", "state.pt"], "ddp", 4, None),  # any number of processes
        (["trainable.safetensors", "state.pt"], "deepspeed_stage_2", 2, "written by vtc in its own layout"),
        (ZERO_2_FILES, "deepspeed_stage_1", 2, None),  # ZeRO-1 and ZeRO-2 read each other's
        (ZERO_2_FILES, "deepspeed_stage_3", 2, "written by DeepSpeed ZeRO-1/2, which deepspeed_stage_3"),
        (
            ZERO_2_FILES,
            "ddp",
            2,
            r"resume it with trainer.strategy=deepspeed_stage_2 \(or deepspeed_stage_1\)",
        ),
        (ZERO_3_FILES, "deepspeed_stage_2", 2, "resume it with trainer.strategy=deepspeed_stage_3"),
        (ZERO_3_FILES, "deepspeed_stage_3", 1, "partitioned over 2"),
        (
            [f"checkpoint/bf16_{name.split('/')[1]}" for name in ZERO_2_FILES[:2]],
            "deepspeed_stage_1",
            1,
            "over 2",
        ),
    ],
)
def test_a_checkpoint_another_strategy_cannot_read_is_refused_before_anything_is_built(
    tmp_path, files, strategy, devices, refused
):
    """What a strategy cannot read back is refused, --force or not: switched from DDP to ZeRO-2
    it failed once the model was built with Lightning's 'not a valid DeepSpeed checkpoint', from
    ZeRO-2 to ZeRO-3 with DeepSpeed's AssertionError, from ZeRO-2 to DDP calling the checkpoint
    damaged, each after the forced recipe had replaced the run's recipe.yaml."""
    from train.recipe import load_recipe
    from train.run import check_resumable

    start = fake_checkpoint(tmp_path / "run" / "ckpt" / "stage1-instruct-step0000004", files)
    recipe = load_recipe(
        "tiny/smoke", [f"trainer.strategy={strategy}", f"trainer.devices={devices}"], check_machine=False
    )
    if refused is None:
        check_resumable(start, recipe)
    else:
        with pytest.raises(UserError, match=refused):
            check_resumable(start, recipe)


def test_a_deepspeed_checkpoint_damaged_after_its_save_is_named_before_any_rank_loads_it(tmp_path):
    """A shard cut short (a partial copy) or a rank's optimizer states missing: one line naming
    the checkpoint and the one to resume from instead. Each rank loads its own files, so before
    the rank that could not raised torch's `PytorchStreamReader failed reading zip archive` alone
    and the other died in the next collective (gloo: `Connection closed by peer`)."""
    from train.recipe import load_recipe
    from train.run import check_resumable

    recipe = load_recipe(
        "tiny/smoke", ["trainer.strategy=deepspeed_stage_3", "trainer.devices=2"], check_machine=False
    )
    ckpt = tmp_path / "run" / "ckpt"
    check_resumable(fake_checkpoint(ckpt / "stage1-instruct-step0000004", ZERO_3_FILES, saved_by=2), recipe)
    shard = ckpt / "stage1-instruct-step0000004" / ZERO_3_FILES[-1]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(
        UserError, match=r"cannot be read \(BadZipFile: checkpoint/zero_pp_rank_1_mp_rank_00_optim"
    ):
        check_resumable(fake_checkpoint(shard.parents[1], [], saved_by=2), recipe)
    shard.unlink()
    with pytest.raises(UserError, match="optimizer states of 1 of the 2 processes that saved it"):
        check_resumable(fake_checkpoint(shard.parents[1], [], saved_by=2), recipe)
