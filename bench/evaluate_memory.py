"""Peak memory of `vtc evaluate` per `--dtype`, on a LLaVA of real widths.

The model is LLaVA-1.5-7B's widths with fewer LLM layers (CLIP-L/336's tower of 1,024, an LLM
of 4,096 with 11,008-wide MLPs, vtc's tiny vocabulary; `--llm-layers 6`: 1.5 B parameters),
random weights saved in bfloat16 as released checkpoints are, in a temporary folder. Each
`--dtype` runs `vtc evaluate FOLDER --limit 1 --no-timing --baselines "" --device cpu` in a
process of its own and prints its peak resident set beside the weights' size in that
precision. `--code DIR` runs another checkout's `vtc` on the same folder (e.g. an older commit
through `git worktree add DIR COMMIT`), to compare.

The model is written by a process of its own too, and this one never imports torch: a child's
peak counts the memory of the parent it was forked from.

    python bench/evaluate_memory.py [--llm-layers 6] [--dtypes bfloat16 float32] [--code DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per parameter, by vtc's --dtype names


def peak_of(command: list[str], cwd: Path) -> tuple[float, float]:
    """(peak resident set in GB, seconds) of `command` run to its end in `cwd`; it must exit 0."""
    started = time.time()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1e6, time.time() - started  # ru_maxrss is in kB on Linux


def write_model(out: Path, vision_layers: int, llm_layers: int) -> None:
    """The model at `out` (llava-hf, bfloat16); prints its parameter count."""
    import torch

    from models.build import build, save_as_llava_hf
    from models.tiny import TinyConfig

    shape = TinyConfig(
        image_size=336,
        patch_size=14,
        vision_width=1024,
        vision_layers=vision_layers,
        vision_heads=16,
        llm_width=4096,
        llm_layers=llm_layers,
        llm_heads=32,
        max_positions=4096,
    )
    built = build("tiny", tiny=shape, dtype=torch.bfloat16)
    save_as_llava_hf(built, out)
    print(sum(p.numel() for p in built.hf.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-layers", type=int, default=6)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--dtypes", nargs="+", choices=list(BYTES), default=["bfloat16", "float32"])
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--write-model", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.write_model:
        write_model(args.write_model, args.vision_layers, args.llm_layers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make = [sys.executable, __file__, "--write-model", str(base)]
        make += ["--vision-layers", str(args.vision_layers), "--llm-layers", str(args.llm_layers)]
        made = subprocess.run(make, capture_output=True, text=True, check=True)
        parameters = int(made.stdout.split()[-1])
        print(f"{parameters / 1e9:.2f} B parameters; vtc from {args.code}")
        print("| --dtype | weights GB | peak resident GB | seconds |")
        print("|---|---|---|---|")
        for dtype in args.dtypes:
            command = [sys.executable, "-m", "train.cli", "evaluate", str(base), "--limit", "1"]
            command += ["--no-timing", "--baselines", "", "--device", "cpu", "--dtype", dtype]
            peak, seconds = peak_of([*command, "--out", str(Path(tmp) / dtype)], args.code)
            weights = parameters * BYTES[dtype] / 1e9
            print(f"| {dtype} | {weights:.2f} | {peak:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
