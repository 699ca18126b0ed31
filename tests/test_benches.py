"""The bench scripts whose figures the README quotes, run end to end at the smallest size (two
training steps a stage, a few test images): each still trains its recipes, scores them and prints
the figures its tables are made of. A figure measured this way means nothing; what is checked is
that the commands the README gives still run and that their figures hang together (token counts
the recipes imply, ratios of the printed accuracies). Opt-in: `--benches` (~3–5 min);
`.ci/run` runs them after the default suite."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.benches


def quick(tmp_path) -> list[str]:
    """Two steps in the first stage (every bench recipe below has one or two), and a small
    synthetic data set of the recipe's kind in tmp_path, so a fresh clone generates it in seconds."""
    overrides = ["stages.0.steps=2", f"data.cache_dir={tmp_path / 'data'}"]
    overrides += ["data.synthetic.train=512", "data.synthetic.test=16"]
    return [arg for override in overrides for arg in ("--set", override)]


def run_bench(script: str, *args: str) -> str:
    """`python bench/SCRIPT ARGS` from the repository root; its stdout (stderr shown on failure)."""
    done = subprocess.run([sys.executable, f"bench/{script}", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def last_json(stdout: str) -> dict:
    """The indented JSON object a bench prints last (`json.dumps(results, indent=1)`)."""
    return json.loads(stdout[stdout.rindex("\n{\n") :])


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the markdown table among `lines` (header and separator left out), as
    stripped cells."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines if line.startswith("|")]
    return rows[2:]


def json_lines(stdout: str, prefix: str = "") -> list[dict]:
    """Every one-line JSON object of stdout, after `prefix` where one is given."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith(prefix) and line[len(prefix) :].lstrip().startswith("{") and line.endswith("}"):
            rows.append(json.loads(line[len(prefix) :]))
    return rows


def test_tokenpacker_bench(tmp_path):
    results = last_json(
        run_bench(
            "tokenpacker.py", "--seeds", "0", "--repeats", "1", *quick(tmp_path), "--set", "eval.limit=4"
        )
    )
    # tiny/mlp keeps the base's 8×8 patches; TokenPacker and 2-D pooling at scale/stride 2 keep 4×4
    tokens = {
        name: results[name]["visual_tokens"] for name in ("tiny/mlp", "tiny/tokenpacker", "tiny/avgpool")
    }
    assert tokens == {"tiny/mlp": 64, "tiny/tokenpacker": 16, "tiny/avgpool": 16}
    mlp = results["tiny/mlp"]["accuracy"][0]
    for name in ("tiny/tokenpacker", "tiny/avgpool"):
        accuracy, kept = results[name]["accuracy"][0], results[name]["accuracy_kept_vs_mlp"][0]
        assert kept == pytest.approx(accuracy / mlp, abs=1e-4)
    assert all(seconds > 0 for seconds in results["step_seconds"].values())


def test_llavolta_bench(tmp_path):
    stdout = run_bench(
        "llavolta.py",
        "--seeds",
        "0",
        "--schemes",
        "heavy",
        "--limit",
        "4",
        "--keep",
        str(tmp_path),
        *quick(tmp_path),
    )
    results = last_json(stdout)
    run = results["tiny"]["heavy"][0]
    # the same trained run, scored uncompressed and with its own schedule's pooling (stride 8 from layer 1)
    assert run["none"]["visual_tokens_per_layer"] == [64, 64, 64, 64]
    assert run["heavy"]["visual_tokens_per_layer"] == [64, 8, 8, 8]
    assert run["heavy"]["llm_gflops"] < run["none"]["llm_gflops"]
    flops = results["flops_7b"]
    assert flops["heavy K=2 S=8"]["llm_tflops"] < flops["uncompressed"]["llm_tflops"]
    assert flops["heavy K=2 S=8"]["vision_tflops"] == flops["uncompressed"]["vision_tflops"]


def test_covipal_bench(tmp_path):
    stdout = run_bench(
        "covipal.py",
        "--seeds",
        "0",
        "--limit",
        "4",
        "--tokens",
        "16",
        "--keep",
        str(tmp_path),
        *quick(tmp_path),
    )
    results = last_json(stdout)
    accuracy = results["accuracy"]
    # the trained scorer at its own count, and every training-free baseline at the one budget asked
    assert "tiny/covipal" in accuracy
    baselines = [key for key in accuracy if key.endswith(" @16")]
    assert {"fastv @16", "pdrop @16", "random @16", "pooling @16"} <= set(baselines)
    assert all(len(values) == 1 and 0 <= values[0] <= 1 for values in accuracy.values())
    cost = results["cost_tiny"]  # the scorer's time against the prefill time pruning saves besides it
    saved = cost["base_prefill"] - (cost["pruned_prefill"] - cost["scorer"])
    share = cost["scorer_share_of_saved"]
    assert share == pytest.approx(cost["scorer"] / saved, abs=0.01) if saved > 0 else share is None
    assert (tmp_path / "covipal-s0" / "metrics.json").is_file()


def test_dyvte_bench(tmp_path):
    stdout = run_bench("dyvte.py", "--seeds", "0", "--limit", "4", "--keep", str(tmp_path), *quick(tmp_path))
    results = last_json(stdout)
    (run,) = results["runs"]
    assert 0 <= run["llm_flops_saved"] < 1 and 0 <= run["llm_flops_saved_by_oracle_routers"] < 1
    # FastV and PyramidDrop are measured at the routed model's mean visual tokens, rounded
    budget = max(1, round(run["mean_visual_tokens_over_layers"]))
    assert set(run["baselines_at_that_mean"]) == {f"fastv@{budget}", f"pdrop@{budget}"}
    assert 0 < results["router_time"]["share"] < 1
    assert 0 < results["router_flops_7b"]["share"] < 0.01  # routers are tiny next to a 7B prefill


def test_falcon_bench(tmp_path):
    stdout = run_bench(
        "falcon.py",
        "--runs",
        "distill,thumbnail",
        "--skip",
        "copy",
        "--seeds",
        "0",
        "--limit",
        "8",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--keep",
        str(tmp_path),
        *quick(tmp_path),
    )
    on = "FALCON + register distillation, ReAtten on"
    off = "FALCON + register distillation, ReAtten off"
    thumbnail = "Thumbnail only, no crops"
    runs = {label: json_lines(stdout, label)[0] for label in (on, off, thumbnail)}
    # 7 registers for each of 5 views (thumbnail + 2×2 crops); the thumbnail alone is 8×8 patches
    assert [runs[label]["visual_tokens"] for label in (on, off, thumbnail)] == [35, 35, 64]
    # scored on the same questions: the same prior and the same questions across crops
    assert runs[on]["prior"] == runs[off]["prior"] == runs[thumbnail]["prior"]
    assert runs[on]["across_crops_count"] == runs[thumbnail]["across_crops_count"] > 0
    assert len(runs[on]["reatten_share"]) == 4 and "reatten_share" not in runs[off]  # one per tower layer
    cost = json_lines(stdout, "cost")[0]
    assert cost and all(value is not None for value in cost.values())

    kept = tmp_path / "falcon---register-distillation--reatten-on-s0"
    trained = [json.loads(line) for line in (kept / "answers.jsonl").read_text().splitlines()]
    assert {row["id"].split("-")[0] for row in trained} == {str(i) for i in range(8)}  # --limit 8
    rows = json_lines(run_bench("falcon.py", "--rescore", str(kept), "--limit", "4"))
    assert [row["reatten_at_test"] for row in rows] == ["as trained", "switched off"]
    assert "reatten_share" not in rows[1]

    # each scoring kept its answers: the run as trained against itself with ReAtten off at test,
    # question by question, agrees with the two scorings above
    stdout = run_bench("falcon.py", "--paired", str(kept), str(kept / "answers-reatten-off.jsonl"))
    compared = {row["group"]: row for row in json_lines(stdout)}
    assert compared["across crops"]["n"] == rows[0]["across_crops_count"]
    assert compared["across crops"]["a"] == rows[0]["across_crops"]
    assert compared["across crops"]["b"] == rows[1]["across_crops"]
    assert compared["all"]["n"] == sum(compared[family]["n"] for family in rows[0]["per_family"])
    assert 0 < compared["all"]["p"] <= 1
    # the same pair given twice, as if two seeds: B − A over the pairs is that pair's, twice
    stdout = run_bench("falcon.py", "--paired", *[str(kept), str(kept / "answers-reatten-off.jsonl")] * 2)
    over = {row["group"]: row for row in json_lines(stdout) if row.get("over_pairs")}
    difference = 100 * (compared["across crops"]["b"] - compared["across crops"]["a"])
    assert over["across crops"]["b_minus_a"] == [pytest.approx(difference)] * 2
    assert over["across crops"]["sd"] == 0 and over["across crops"]["p"] == (1.0 if difference == 0 else 0.5)


def test_falcon_bench_sixteen_crops_with_a_ramp(tmp_path):
    """The 4×4-crop and ramp commands of bench/README.md: 17 views of 7 registers reach the LLM,
    and the instruction stage prints the steps its ReAtten ramp covers."""
    sixteen = [
        "data.synthetic.image_size=256",
        "model.views.grids=[[4, 4]]",
        "model.compressors.0.anchor_max=4",
    ]
    ramp = ["stages.1.components={falcon: {reatten_ramp: [0.5, 0.6]}}"]
    stdout = run_bench(
        "falcon.py",
        *("--runs", "distill+copy", "--seeds", "0", "--limit", "8", "--steps", "4", "--repeats", "1"),
        *(arg for override in sixteen + ramp for arg in ("--set", override)),
        *quick(tmp_path),
    )
    (run,) = json_lines(stdout, "FALCON + register distillation, ReAtten on, copy-initialised (the authors')")
    assert run["visual_tokens"] == 17 * 7
    assert "falcon: ReAtten ramped in: 0 until step 2, linear to full at step 3 (of 4)" in stdout


def test_falcon_bench_dot_object(tmp_path):
    """The `match` command of bench/README.md (the shape of the object of the dot's colour, among
    `shape` and `detail`, crowded crops of 2 registers): scored per family, with the questions
    whose dot and object lie in different crops counted across crops."""
    dot_object = [
        "data.synthetic.objects=[12, 16]",
        "data.synthetic.families=[shape, detail, match]",
        "model.compressors.0.registers=2",
    ]
    stdout = run_bench(
        "falcon.py",
        *("--runs", "distill+copy", "--seeds", "0", "--limit", "16", "--steps", "2", "--repeats", "1"),
        *(arg for override in dot_object for arg in ("--set", override)),
        *quick(tmp_path),
    )
    (run,) = json_lines(stdout, "FALCON + register distillation, ReAtten on, copy-initialised (the authors')")
    assert run["visual_tokens"] == 5 * 2
    assert set(run["per_family"]) == {"shape", "detail", "match"}
    # a `shape` or `detail` answer names one cell, so one crop; only `match` (16 questions, one an
    # image) can rest on two, and most of its dots lie in another crop than their object
    assert 0 < run["across_crops_count"] <= 16


def test_half_precision_bench():
    """`python bench/half_precision.py`: for every shipped config and half precision, the cos/sin
    kept by `to_precision` are within that precision's rounding, and rounding `inv_freq` with the
    weights is worse at each length and grows with it."""
    rows = table_rows(run_bench("half_precision.py", "--positions", "300", "700").splitlines())
    assert [(row[0], row[1]) for row in rows] == [
        (config, dtype)
        for config in ("llava-1.5-7b-hf", "siglip-l-384-llama-3.1-8b")
        for dtype in ("float16", "bfloat16")
    ]
    for row in rows:
        (cast_short, kept_short), (cast_long, kept_long) = (map(float, cell.split(" / ")) for cell in row[3:])
        assert max(kept_short, kept_long) <= (0.001 if row[1] == "float16" else 0.004)
        assert kept_short < cast_short < cast_long


def test_evaluate_memory_bench():
    """`python bench/evaluate_memory.py` at one tower and one LLM layer: each precision's row,
    and the bfloat16 evaluation peaks lower than the float32 one by about the weights' difference."""
    lines = run_bench("evaluate_memory.py", "--vision-layers", "1", "--llm-layers", "1").splitlines()
    rows = {cells[0]: [float(c) for c in cells[1:]] for cells in table_rows(lines)}
    assert list(rows) == ["bfloat16", "float32"]
    (half_weights, half_peak, _), (full_weights, full_peak, _) = rows["bfloat16"], rows["float32"]
    assert full_weights == pytest.approx(2 * half_weights, rel=0.02) and half_peak > half_weights
    assert full_peak - half_peak > 0.5 * (full_weights - half_weights)


def test_master_weights_bench():
    """`python bench/master_weights.py` at a small shape: the bfloat16 weights lose updates the
    float32 ones keep."""
    result = last_json(run_bench("master_weights.py", "--steps", "60", "--rows", "128", "--cols", "512"))
    assert result["float32_never_moved"] == 0.0
    assert result["bfloat16_never_moved"] > 0.1 and result["bfloat16_update_error"] > 0.2
