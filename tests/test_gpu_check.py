"""bench/gpu_check.py — the check a user runs first on a GPU node — on CPU: one recipe family
under 2-process DDP (gloo) with small widths: train, SIGKILL, resume, export, load, evaluate."""

import subprocess
import sys

import pytest

sys.path.insert(0, "bench")
from gpu_check import deepest_layer  # noqa: E402


def test_deepest_layer_of_component_settings():
    llavolta = [
        {
            "name": "llavolta",
            "schedule": [{"layer": 2, "stride": 8}, {"layer": 16, "stride": 2}, {"layer": None}],
        }
    ]
    assert deepest_layer(llavolta) == 16
    assert deepest_layer([{"name": "covipal", "layer": 0, "guidance_layer": 16}]) == 16
    assert deepest_layer([{"name": "falcon", "registers": 64}]) == -1


@pytest.mark.slow
def test_gpu_check_wiring_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu", "--only", "dyvte", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("[ok]", "[FAIL]"))]
    assert len(lines) == 5 and all(line.startswith("[ok]") for line in lines), out.stdout
    assert "0 check(s) failed" in out.stdout
