"""bench/gpu_check.py — the check a user runs first on a GPU node — on CPU: recipe families
under 2-process DDP (gloo) with small widths, and FALCON's through Lightning's DeepSpeed: train, SIGTERM (the step saved, exit 143), resume,
export, load, evaluate, ask. About a minute or two a family, so only with `--families`
(`.ci/run` passes it)."""

import subprocess
import sys

import pytest

sys.path.insert(0, "bench")
from gpu_check import FAMILIES, ROOT, deepest_layer, family_zeros, overrides  # noqa: E402


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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_gpu_run_of_the_check_is_a_valid_recipe(family, tmp_path):
    """What the check trains on a GPU (ZeRO-2 and ZeRO-3; DDP for DyVTE, which vtc refuses
    under DeepSpeed) passes `vtc validate --anywhere`, so no family fails the check by recipe."""
    import yaml

    from train.recipe import RECIPES_DIR, load_recipe

    chained = [yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()) for name in FAMILIES[family]]
    zeros = family_zeros(chained, [2, 3])
    assert zeros == ([0] if family == "dyvte" else [2, 3])
    for zero in zeros:
        for name, recipe in zip(FAMILIES[family], chained, strict=True):
            base = ROOT / recipe["model"]["base"]  # the architecture's config.json, as the reduced base has
            args = overrides(recipe, base, None, tmp_path / "run", tmp_path / "data", zero, cpu=False)
            strategy = load_recipe(name, args, check_machine=False).trainer.strategy
            assert strategy == (f"deepspeed_stage_{zero}" if zero else "ddp")


def check_family_on_cpu(family: str, out_dir, *options: str) -> None:
    """`bench/gpu_check.py --cpu --only FAMILY`: 6 checks per recipe of the family, all [ok]."""
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu", "--only", family, "--out", str(out_dir), *options],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("[ok]", "[FAIL]"))]
    assert len(lines) == 6 * len(FAMILIES[family]), out.stdout
    assert all(line.startswith("[ok]") for line in lines), out.stdout
    assert "0 check(s) failed" in out.stdout


@pytest.mark.slow
@pytest.mark.families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_recipe_family_under_two_process_ddp(family, tmp_path):
    """Each family's shipped recipes, chained, with small widths under 2-process DDP (gloo):
    train, SIGTERM, resume, export, load, evaluate, ask."""
    check_family_on_cpu(family, tmp_path)


@pytest.mark.slow
@pytest.mark.families
def test_falcon_under_lightnings_deepspeed_zero_3_on_cpu(tmp_path):
    """The FALCON family (views, ReAtten, LLM LoRA) through Lightning's DeepSpeedStrategy at
    ZeRO-3, as on a GPU, run on CPU by tests/deepspeed_on_cpu.py: `--cpu --zero 3`, ~2 min.
    Before 2026-12-08 it failed at the first optimizer step of any DeepSpeed run."""
    check_family_on_cpu("falcon", tmp_path, "--zero", "3")
