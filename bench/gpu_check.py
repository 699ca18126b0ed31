"""The first thing to run on a rented GPU node (and what the project runs whenever a GPU is
lent): every family of shipped GPU recipes, with its real component settings, on a reduced base
of the real widths — 2 vision layers, 2 decoder layers (or as many as a component's setting
names: LLaVolta's K = 16, CoViPAL's guidance layer 16), random weights, the tiny tokenizer
(with a Llama-3-shaped chat template, for recipes with `template: chat`) — through Lightning's
DeepSpeedStrategy at ZeRO-2 and ZeRO-3 (DyVTE, which vtc refuses under DeepSpeed, under its
recipe's DDP), a few steps each, stage 2 started from stage 1's run as the shipped recipes chain
them. For each recipe: train until the first
checkpoint, SIGTERM every process of the job as a scheduler does (the run saves the step under
way and exits 143), resume to the end, export, load the export back,
evaluate a few questions (`vtc evaluate --device cuda --dtype bfloat16`, timed once; with
`--cpu` on cpu, untimed), checking the report says where they ran, and ask the export one
question (`vtc ask`, on the same device and precision). One line per check; exit
status 1 if any failed.

    python bench/gpu_check.py [--only tokenpacker,falcon] [--zero 2,3] [--out DIR] [--cpu]

`--cpu` runs the same checks on CPU with small widths, 2 processes over gloo (fp32): under DDP,
or with `--zero N` through Lightning's DeepSpeedStrategy on DeepSpeed's CPU accelerator
(`tests/deepspeed_on_cpu.py` lifts Lightning's CUDA-only checks). `tests/test_gpu_check.py` runs
each family under DDP, and FALCON's at ZeRO-3.
On one H200 the whole check is meant to take a few minutes; the LLaVolta and CoViPAL checks
(17 decoder layers of width 4096) need a GPU with 80 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# family → its recipes in the order they chain (each later one starts from the one before)
FAMILIES = {
    "tokenpacker": ["llava-1.5-7b/tokenpacker/pretrain", "llava-1.5-7b/tokenpacker/finetune"],
    "llavolta": ["llava-1.5-7b/llavolta/pretrain", "llava-1.5-7b/llavolta/finetune-4stage"],
    "falcon": ["llava-1.5-7b/falcon/pretrain", "llava-1.5-7b/falcon/finetune"],
    "falcon-siglip": ["siglip-l-384-llama-3.1-8b/falcon/stage1", "siglip-l-384-llama-3.1-8b/falcon/stage2"],
    "covipal": ["llava-1.5-7b/covipal/scorer", "llava-1.5-7b/covipal/end-to-end"],
    "dyvte": ["llava-1.5-7b/dyvte/routers"],
}
STEPS, EVERY = 4, 2  # optimizer steps per stage; a checkpoint every 2 (the signal comes after the first)
CPU_WIDTHS = {"text": (64, 128, 4), "vision": (32, 64, 2)}  # hidden, MLP, heads


def deepest_layer(params) -> int:
    """The deepest decoder layer a component's settings name (-1 if none): any int under a key
    ending in `layer` (`layer`, `guidance_layer`, LLaVolta's schedule entries)."""
    found = [-1]
    if isinstance(params, dict):
        for key, value in params.items():
            if str(key).endswith("layer") and isinstance(value, int) and not isinstance(value, bool):
                found.append(value)
            else:
                found.append(deepest_layer(value))
    elif isinstance(params, list):
        found += [deepest_layer(v) for v in params]
    return max(found)


def reduced_base(config_dir: Path, out: Path, llm_layers: int, cpu: bool) -> Path:
    """A llava-hf folder: the real config with 2 vision layers and `llm_layers` decoder layers
    (small widths with `cpu`), random weights, the tiny tokenizer (its ids fit the real vocab)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from models.tiny import IMAGE_PLACEHOLDER, tiny_chat_tokenizer

    if (out / "config.json").is_file():
        return out
    config = LlavaConfig.from_pretrained(config_dir)
    text, vision = config.text_config, config.vision_config
    text.num_hidden_layers, vision.num_hidden_layers = llm_layers, 2
    if cpu:
        (text.hidden_size, text.intermediate_size, text.num_attention_heads) = CPU_WIDTHS["text"]
        text.num_key_value_heads, text.head_dim = text.num_attention_heads, None
        text.head_dim = text.hidden_size // text.num_attention_heads
        (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) = CPU_WIDTHS["vision"]
    # recipes with `template: chat` prompt through the tokenizer's chat template: the stand-in
    # gets one shaped like Llama-3's (header tokens, an end of turn other than eos)
    tokenizer = tiny_chat_tokenizer()
    config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def deepspeed_refused(recipe: dict) -> bool:
    """Whether a component of the recipe trains one part of itself per step (DyVTE's routers),
    which `vtc validate` refuses under DeepSpeed (`Compressor.trains_one_part_per_step`)."""
    from models.compressors import component_class

    return any(
        component_class(c["name"]).trains_one_part_per_step for c in recipe["model"].get("compressors") or []
    )


def family_zeros(chained: list[dict], zeros: list[int]) -> list[int]:
    """The ZeRO stages a family's chained recipes run under; 0: DDP (once, for a family vtc
    refuses under DeepSpeed)."""
    if any(deepspeed_refused(recipe) for recipe in chained):
        return [0]
    return zeros


def overrides(
    recipe: dict, base: Path, init: Path | None, run: Path, data: Path, zero: int, cpu: bool
) -> list[str]:
    image_size = json.loads((base / "config.json").read_text())["vision_config"]["image_size"]
    out = [
        f"model.base={base}",
        f"model.init={init or 'null'}",
        f"output={run}",
        f"data.synthetic={{train: 64, test: 8, seed: 0, image_size: {image_size}, grid: 4}}",
        "data.train_shards=null",
        "data.num_workers=0",
        f"data.cache_dir={data}",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=2",
        "trainer.num_nodes=1",
        "eval.after_training=false",
        "wandb.enabled=false",
    ]
    if cpu:  # 2 processes over gloo, fp32: DDP, or DeepSpeed through tests/deepspeed_on_cpu.py
        strategy = f"deepspeed_stage_{zero}" if zero else "ddp"
        accelerator = "auto" if zero else "cpu"  # vtc refuses DeepSpeed with accelerator 'cpu'
        out += [f"trainer.strategy={strategy}", "trainer.devices=2", f"trainer.accelerator={accelerator}"]
        out += ["trainer.threads=1", "trainer.precision=32-true", "model.dtype=float32"]
    elif zero:
        out += [f"trainer.strategy=deepspeed_stage_{zero}", "trainer.devices=1"]
    else:  # a recipe vtc refuses under DeepSpeed: its own DDP, on the one GPU
        out += ["trainer.strategy=ddp", "trainer.devices=1"]
    devices = 2 if cpu else 1
    for i, _ in enumerate(recipe["stages"]):
        out += [f"stages.{i}.steps={STEPS}", f"stages.{i}.epochs=null", f"stages.{i}.batch_size=1"]
        out += [f"stages.{i}.global_batch_size={2 * devices}"]  # 2 micro-batches per step: accumulation too
    return out


class Checks:
    def __init__(self):
        self.failed = 0

    def line(self, ok: bool, what: str, detail: str = "") -> bool:
        self.failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok


VTC = [sys.executable, "-m", "train.cli"]
# `vtc` through Lightning's DeepSpeedStrategy on CPU (--cpu --zero N)
VTC_DEEPSPEED_ON_CPU = [sys.executable, str(ROOT / "tests" / "deepspeed_on_cpu.py")]


def vtc(*args: str, timeout: float = 900, launcher: list[str] = VTC) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tail(text: str) -> str:
    """The last line of a command's output (its error, when it failed)."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def train_stop_resume(
    name: str, args: list[str], run: Path, checks: Checks, what: str, launcher: list[str] = VTC
) -> bool:
    """Train until the first checkpoint exists, then SIGTERM the job's every process as a
    scheduler does: the run must save the step under way and exit 143; then `--resume auto`
    to the end."""
    started = time.time()
    log = run.parent / f"{run.name}-train.log"  # a file, not a pipe: nobody reads it while it runs
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        process = subprocess.Popen(
            [*launcher, "train", name, *args],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the signal reaches the DDP children
        )
        stopped = False
        while process.poll() is None:
            if any((run / "ckpt").glob("*/info.json")):
                os.killpg(process.pid, signal.SIGTERM)
                stopped = True
                break
            time.sleep(0.2)
        process.wait()
    said = log.read_text()
    if stopped:
        told = [line for line in said.splitlines() if "terminated (SIGTERM)" in line]
        saved = bool(told) and ("so nothing is lost" in told[-1] or "as training ended" in told[-1])
        if not checks.line(
            process.returncode == 128 + signal.SIGTERM and saved,
            f"{what} train to the first checkpoint, then SIGTERM",
            f"exit {process.returncode}: {(told or [tail(said)])[-1]} ({time.time() - started:.0f} s)",
        ):
            return False
    elif process.returncode != 0:
        return checks.line(False, f"{what} train", f"{tail(said)} (log: {log})")
    else:
        checks.line(True, f"{what} train (ended before the signal)", f"{time.time() - started:.0f} s")
    started = time.time()
    resumed = vtc("train", name, *args, "--resume", "auto", launcher=launcher)
    if resumed.returncode != 0:
        return checks.line(False, f"{what} resume", tail(resumed.stdout + resumed.stderr))
    meta = json.loads((run / "meta.json").read_text())
    steps = [stage["steps"] for stage in meta["stages"]]
    return checks.line(
        all(s == STEPS for s in steps),
        f"{what} resume to the end",
        f"steps {steps}, {time.time() - started:.0f} s",
    )


def export_and_evaluate(run: Path, out: Path, checks: Checks, what: str, cpu: bool) -> None:
    exported = vtc("export", str(run), str(out))
    if not checks.line(
        exported.returncode == 0, f"{what} export", tail(exported.stderr) if exported.returncode else ""
    ):
        return
    loaded = subprocess.run(
        [sys.executable, "-c", f"from models.export import load_pretrained; load_pretrained({str(out)!r})"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    checks.line(
        loaded.returncode == 0,
        f"{what} load the export back",
        tail(loaded.stderr) if loaded.returncode else "",
    )
    # on the GPU in the precision the GPU recipes train in, with one timed repeat (latency and
    # CUDA peak memory); on CPU accuracy only
    placement = ["--device", "cpu"] if cpu else ["--device", "cuda", "--dtype", "bfloat16"]
    options = placement + (["--no-timing"] if cpu else ["--repeats", "1", "--latency-batch", "2"])
    evaluated = vtc("evaluate", str(run), "--limit", "4", "--baselines", "", "--batch-size", "4", *options)
    device = placement[1]
    report = run / "eval.json"
    ran_on = (
        json.loads(report.read_text())["machine"]["device"]
        if evaluated.returncode == 0 and report.is_file()
        else None
    )
    detail = tail(evaluated.stderr) if evaluated.returncode else f"4 test images on {ran_on}"
    checks.line(ran_on is not None and ran_on.startswith(device), f"{what} evaluate", detail)
    ask(out, placement, checks, what)


def ask(export: Path, placement: list[str], checks: Checks, what: str) -> None:
    """`vtc ask` of the export about one synthetic test image, on the evaluation's device."""
    from data.synth import make_sample

    size = json.loads((export / "config.json").read_text())["vision_config"]["image_size"]
    image = export.parent / f"{export.name}-ask.png"
    make_sample("test", 0, 0, size, 4)["image"].save(image)
    asked = vtc("ask", str(export), str(image), "What colour is the dot?", "--json", *placement)
    rows = [json.loads(line) for line in asked.stdout.splitlines() if line.startswith("{")]
    ok = asked.returncode == 0 and len(rows) == 1 and rows[0]["visual_tokens"] > 0
    detail = f"{rows[0]['answer']!r}, {rows[0]['visual_tokens']} visual tokens" if ok else tail(asked.stderr)
    checks.line(ok, f"{what} ask the export", detail)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help=f"comma-separated families (default all: {', '.join(FAMILIES)})")
    parser.add_argument(
        "--zero",
        help="ZeRO stages to run each recipe under (default 2,3; with --cpu, DDP unless given: then "
        "Lightning's DeepSpeedStrategy on CPU through tests/deepspeed_on_cpu.py)",
    )
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    parser.add_argument(
        "--cpu", action="store_true", help="2 processes on CPU, small widths (DDP unless --zero is given)"
    )
    args = parser.parse_args()
    families = args.only.split(",") if args.only else list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU visible: run with --cpu to check the wiring on CPU")
    zeros = [int(z) for z in args.zero.split(",")] if args.zero else [0] if args.cpu else [2, 3]
    launcher = VTC_DEEPSPEED_ON_CPU if args.cpu and args.zero else VTC
    work = Path(args.out or tempfile.mkdtemp(prefix="vtc-gpu-check-"))
    checks, started = Checks(), time.time()
    from train.recipe import RECIPES_DIR

    for family in families:
        chained = [yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()) for name in FAMILIES[family]]
        for zero in family_zeros(chained, zeros):
            init = None
            for name, recipe in zip(FAMILIES[family], chained, strict=True):
                llm_layers = max(2, 1 + deepest_layer(recipe["model"].get("compressors") or []))
                config_dir = ROOT / recipe["model"]["base"]
                base = reduced_base(
                    config_dir, work / f"base-{config_dir.name}-{llm_layers}", llm_layers, args.cpu
                )
                run = work / f"z{zero}" / name.replace("/", "-")
                strategy = f"ZeRO-{zero}" if zero else "DDP"
                where = f"CPU {strategy}×2" if args.cpu else strategy if zero else "DDP×1"
                what = f"{name} {where} ({llm_layers} decoder layers)"
                recipe_args = overrides(recipe, base, init, run, work / "data", zero, args.cpu)
                if not train_stop_resume(name, recipe_args, run, checks, what, launcher):
                    break
                export_and_evaluate(
                    run, work / f"z{zero}" / f"{name.replace('/', '-')}-export", checks, what, args.cpu
                )
                init = run
    print(f"{checks.failed} check(s) failed; {time.time() - started:.0f} s; work folder {work}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
