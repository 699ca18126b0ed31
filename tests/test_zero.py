"""vtc's ZeRO-1/2/3 code run for real on CPU: DeepSpeed engines on 2 gloo processes.

Lightning's DeepSpeedStrategy needs CUDA, so this drives DeepSpeed directly (DS_ACCELERATOR=cpu)
with vtc's ZeRO settings, LoRA + projector trainables, and vtc's gather/load functions
(`train/zero.py`), which `save_trainables` / `model.init` use under any strategy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("zero_worker.py")


@pytest.mark.slow
def test_zero_1_2_and_3_gather_save_and_load_trainables(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path),
        "1",  # the FALCON-8B recipes' stage (optimizer states partitioned, weights whole)
        "2",
        "3",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in (1, 2, 3):
        result = json.loads((tmp_path / f"stage{stage}" / "result.json").read_text())
        saved = load_file(str(tmp_path / f"stage{stage}" / "trainable.safetensors"))
        if stage == 3:  # parameters really are partitioned: read directly, they are empty
            assert result["partitioned"] == result["parameters"]
            assert result["empty_projector_tensors_outside_gather"] == 4
        else:
            assert result["partitioned"] == 0 and result["empty_projector_tensors_outside_gather"] == 0
        # gathered full tensors, the same on both ranks, trained, finite
        assert result["shapes"]["projector.linear_1.weight"] == [64, 32]
        assert {k: list(v.shape) for k, v in saved.items()} == result["shapes"]
        assert any("lora_A" in k for k in saved) and all("base_layer" not in k for k in saved)
        assert len(set(result["rank_digests"])) == 1
        assert result["changed_by_training"] and result["finite"]
        # loaded into a fresh (partitioned) model: the same weights and the same logits
        assert result["reloaded_equal"] and result["same_logits_after_load"]
        assert result["deepspeed_checkpoint_equal"]


@pytest.mark.slow
@pytest.mark.families
def test_a_deepspeed_save_failing_on_one_rank_reaches_every_rank(tmp_path):
    """vtc's hold on DeepSpeed's save (`train/checkpoint.py DeepSpeedSaveHold`): rank 1's writes
    fail as a full disk fails them, rank 0's succeed, and both come back from the save (without
    the hold, rank 1 raised inside it and rank 0 was left at its last barrier: over gloo the
    peer's exit ends it, over NCCL the process group's timeout would), each knowing its own
    error; a save that works is loaded by DeepSpeed from the `latest` vtc writes. Lightning's
    DeepSpeed strategy, which calls it, needs CUDA (`bench/gpu_check.py`); `--families`, 12 s."""
    worker = Path(__file__).with_name("deepspeed_save_worker.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["held"] == [None, "OSError: [Errno 28] No space left on device"]
    assert not result["second_save_held"] and result["restored"]
    assert not result["deepspeed_wrote_latest"] and result["latest"] == "checkpoint"
    assert result["client_step"] == 7 and result["loaded_equal"]
