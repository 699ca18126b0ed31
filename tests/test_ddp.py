"""The real training path with 2 DDP processes on CPU (gloo), launched as a user would."""

import json
import os
import subprocess

import pytest

from tests.conftest import smoke_train_cmd

# 2 DDP processes on CPU (gloo), one thread each, recording each rank's samples and weights
TWO_PROCESSES = (
    "trainer.strategy=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.record_samples=true",
    "trainer.threads=1",
)


@pytest.mark.slow
def test_two_process_ddp_disjoint_data_identical_weights(tmp_path):
    """Both ranks see different samples and end with identical trainables (LoRA included), also
    for a component whose parameters learn only in some steps (of two gates, one per step: DDP
    must look for unused parameters, `Compressor.sparse_gradients`)."""
    run_dir = tmp_path / "ddp"
    cmd = smoke_train_cmd(
        run_dir,
        tmp_path / "data",
        *TWO_PROCESSES,
        "stages.0.steps=3",
        "stages.1.steps=6",
        "stages.1.train.llm=lora",
        "model.compressors=[{name: test_alternating_gates}]",
    )
    cmd[1:3] = ["tests/train_with_components.py"]  # `vtc` with the test components registered
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage, steps, batch in (("vision", 3, 16), ("instruct", 6, 8)):
        records = [json.loads((run_dir / f"record-{stage}-rank{r}.json").read_text()) for r in (0, 1)]
        seen = [set(r["seen_ids"]) for r in records]
        assert all(len(r["seen_ids"]) == steps * batch for r in records)
        assert not seen[0] & seen[1], "the two ranks trained on overlapping samples"
        assert records[0]["weights_sha256"] == records[1]["weights_sha256"], (
            "ranks ended with different weights"
        )
    assert (run_dir / "metrics.json").is_file()
    assert not (
        run_dir / "hf"
    ).exists()  # LoRA run: adapters saved as trainables, no unmerged llava-hf export
    from safetensors.torch import load_file

    gates = load_file(str(run_dir / "trainable.safetensors"))
    assert all(float(gates[f"compressors.0.gates.{i}"]) != 1.0 for i in (0, 1))  # both learned


@pytest.mark.slow
def test_two_process_ddp_trains_dyvte_routers_one_layer_per_step(tmp_path):
    """DyVTE learns one router per step (the drawn layer): under 2-process DDP the unused ones
    are found every step, both ranks draw the same layer and end with identical routers."""
    run_dir = tmp_path / "ddp"
    cmd = smoke_train_cmd(
        run_dir,
        tmp_path / "data",
        *TWO_PROCESSES,
        "model.tiny.llm_layers=3",  # two routers
        "model.compressors=[{name: dyvte, hidden: 16}]",
        "stages=[{name: routers, objective: aux, steps: 6, batch_size: 8, "
        "train: {vision: frozen, projector: frozen, compressors: full, llm: frozen}}]",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads((run_dir / f"record-routers-rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    import csv

    from safetensors.torch import load_file

    rows = list(csv.DictReader(open(run_dir / "logs" / "routers" / "metrics.csv")))
    drawn = {float(r["schedule/dyvte.layer"]) for r in rows if r.get("schedule/dyvte.layer")}
    assert drawn == {0.0, 1.0}
    routers = load_file(str(run_dir / "trainable.safetensors"))
    assert {k.split(".")[3] for k in routers} == {"0", "1"}


@pytest.mark.slow
@pytest.mark.families
def test_sigterm_to_one_rank_saves_on_every_rank_and_stops_them_all(tmp_path):
    """A SIGTERM that reaches one rank only (here rank 1, which Lightning started): every rank
    saves the same step and stops with status 143, and the run resumes from that step. Half a
    minute of DDP, so with `--families` (as `.ci/run` runs it); `bench/gpu_check.py --cpu`, in
    the default run, signals both ranks."""
    import signal
    import sys
    import time

    run_dir = tmp_path / "ddp"
    cmd = smoke_train_cmd(run_dir, tmp_path / "data", *TWO_PROCESSES, "stages.1.steps=60")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    vision_done = run_dir / "ckpt" / "stage0-vision-step0000004"  # handlers are in place by then
    deadline = time.time() + 300
    while not vision_done.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    rank_1 = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(rank_1) == 1, rank_1
    os.kill(int(rank_1[0]), signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = sorted((run_dir / "ckpt").glob("stage1-instruct-step*"))
    assert len(saved) == 1 and "Traceback" not in err
    step = int(saved[0].name[-7:])
    assert 0 < step < 60 and f"saved as {saved[0].name}, so nothing is lost" in err
    resumed = subprocess.run(
        [sys.executable, "-m", "train.cli", "resume", str(run_dir)], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved[0]}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.families
@pytest.mark.parametrize("phase", ["write", "complete"])
def test_a_save_only_rank_0_fails_stops_every_rank_at_once(tmp_path, phase):
    """Under DDP rank 0 alone writes a checkpoint: when its write fails (here a full disk, on the
    weights or on info.json) every rank stops at once with one line, rather than the others
    waiting at the next barrier for the process group's timeout (on NCCL; on gloo they died with
    a traceback of the broken connection); the partial save is gone and the run resumes from the
    newest complete checkpoint. `--families`, as each is 15 s of DDP."""
    import sys

    run_dir = tmp_path / "ddp"
    cmd = smoke_train_cmd(run_dir, tmp_path / "data", *TWO_PROCESSES, "checkpoint.every=2")
    cmd[1:3] = ["tests/fail_save.py"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd(), "VTC_TEST_FAIL": f"{phase}:2"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in run.stderr.splitlines() if line.startswith("vtc: error: ")]
    assert run.returncode == 2 and len(lines) == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert sorted(lines) == [
        "vtc: error: another process of this run failed to "
        f"{phase} checkpoint stage0-vision-step0000004 (its error is in its output); stopping too",
        f"vtc: error: no space left in {run_dir / 'ckpt'} for checkpoint stage0-vision-step0000004, so it "
        "was removed (the newest complete one is stage0-vision-step0000002): free some (older checkpoints "
        f"there can go; a save needs room for one more than checkpoint.keep_last), then `vtc resume {run_dir}`",
    ]
    assert [p.name for p in (run_dir / "ckpt").iterdir()] == ["stage0-vision-step0000002"]
    resumed = subprocess.run(
        [sys.executable, "-m", "train.cli", "resume", str(run_dir)], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0 and (run_dir / "trainable.safetensors").is_file(), resumed.stderr[-3000:]


NONFINITE_ON_RANK_1 = """
import os, sys
import train.module
total, calls = train.module.weighted_total, []

def weighted_total(*args, **kwargs):  # rank 1's 8th loss (stage 'instruct', step 3) is NaN
    calls.append(1)
    loss = total(*args, **kwargs)
    return loss * float("nan") if os.environ.get("LOCAL_RANK") == "1" and len(calls) == 8 else loss

train.module.weighted_total = weighted_total
from train.cli import main
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.families
def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_once(tmp_path):
    """One rank's batch gives a NaN loss: that rank stops as on one device, and the others stop
    with it, each with one line. Before, they went on into the gradient all-reduce: over gloo they
    died with a traceback of the closed connection (seen), over NCCL they would wait for the
    process group's timeout. `--families`, ~10 s."""
    script = tmp_path / "nonfinite_on_rank_1.py"  # a file: Lightning runs it again for rank 1
    script.write_text(NONFINITE_ON_RANK_1)
    cmd = smoke_train_cmd(tmp_path / "ddp", tmp_path / "data", *TWO_PROCESSES)
    cmd[1:3] = [str(script)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in run.stderr.splitlines() if line.startswith("vtc: error: ")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert sorted(lines) == [
        "vtc: error: another process of this run met a non-finite loss at step 3 of stage 'instruct'; "
        "stopping too",
        "vtc: error: non-finite loss nan at step 3 of stage 'instruct'; stopped before it reached the "
        "weights (the last checkpoint is the last good one): lower the stage's optim.lr, or set "
        "trainer.nonfinite_loss: skip",
    ]
