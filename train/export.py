"""`vtc export`: a finished run → a self-describing folder that `models.export.load_pretrained`
loads with one call (see models/export.py for the layout)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.errors import UserError
from models.build import ComponentSpec
from models.compressors import component_class
from models.export import FORMAT, export, merge_lora
from models.lora import unwrapped_name
from train.checkpoint import checkpoint_at, unfinished_run
from train.freeze import apply_stage
from train.outputs import write_dir_atomic
from train.recipe import load_recipe, resolve_base
from train.run import build_from_recipe, load_trainables


def rebuild_run(run_dir: Path, compressors: list[ComponentSpec] | None = None, dtype: str | None = None):
    """The run's model as training left it: base + components, LoRA injected as its stages did,
    trained weights loaded from trainable.safetensors. `run_dir` may also be one of the run's step
    checkpoints (`RUN_DIR/ckpt/stage<i>-<name>-step<N>/`): the model at that step, LoRA injected as
    the stages up to that one did. `compressors`: the run's own with other settings (e.g. another
    token budget), same names and weights; [] leaves them out (the trained model without
    compression). `dtype`: build it in that precision (a DTYPES name) instead of the recipe's
    `model.dtype`; the trained weights are rounded to it as they load."""
    checkpoint = checkpoint_at(run_dir)
    root = checkpoint.run_dir if checkpoint else run_dir
    weights = run_dir / "trainable.safetensors"
    if not (root / "recipe.yaml").is_file() or not weights.is_file():
        if checkpoint:  # DeepSpeed writes its own sharded layout in place of trainable.safetensors
            raise UserError(
                f"{run_dir}: a checkpoint without trainable.safetensors (DeepSpeed's sharded layout); "
                f"resume the run to its end (vtc resume {root}) and export that"
            )
        unfinished = unfinished_run(run_dir, "export {} OUT")
        if unfinished:
            raise UserError(unfinished)
        what = (
            "no such folder"
            if not run_dir.is_dir()
            else "not a finished run (no recipe.yaml and trainable.safetensors) nor one of its checkpoints"
        )
        raise FileNotFoundError(f"{run_dir}: {what}")
    recipe = load_recipe(root / "recipe.yaml", check_machine=False)
    if compressors is not None:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, compressors=compressors))
    if dtype is not None:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype))
    built = build_from_recipe(recipe)
    prefix = "model." if checkpoint else ""  # a checkpoint keys weights as the LightningModule does
    if recipe.model.init:
        restore_init(built.model, recipe.model.init, weights, prefix)
    for stage in recipe.stages[: checkpoint.stage_index + 1] if checkpoint else recipe.stages:
        apply_stage(built.model, stage)  # injects LoRA where a stage trained with it
    skip = ("compressors.",) if compressors == [] else ()
    load_trainables(built.model, str(weights), skip=skip, prefix=prefix)
    return built, recipe.model.projector, recipe.model.compressors, resolve_base(recipe.model.base)


def restore_init(model, init: str, weights: Path, prefix: str = "") -> None:
    """Load what `model.init` gave the run that its `weights` file lacks: a run trained before
    2026-12-07 saved only what its stages trained, so routers trained on an initialised
    TokenPacker were exported without it. Nothing where the file holds it all (newer runs) or
    the init file is gone."""
    from safetensors import safe_open

    from train.zero import load_state

    source = Path(init) / "trainable.safetensors" if Path(init).is_dir() else Path(init)
    if not source.is_file():
        return
    with safe_open(str(weights), "pt") as held_file:
        held = {unwrapped_name(k.removeprefix(prefix)) for k in held_file.keys()}
    wanted = {name for name, _ in model.named_parameters()} - held  # not the compressors left out
    with safe_open(str(source), "pt") as init_file:
        missing = {k: init_file.get_tensor(k) for k in init_file.keys() if k in wanted}
    if missing:
        load_state(model, missing)


def recipe_of(run_dir: Path):
    """The recipe of a run (or of the run one of its checkpoints belongs to); None where
    `run_dir` holds no run's recipe (rebuild_run then says why)."""
    checkpoint = checkpoint_at(run_dir)
    recipe_file = (checkpoint.run_dir if checkpoint else run_dir) / "recipe.yaml"
    return load_recipe(recipe_file, check_machine=False) if recipe_file.is_file() else None


def run_base(run_dir: Path) -> str | None:
    """The `model.base` a run (or one of its checkpoints) was trained on, as `rebuild_run`
    resolves it; None where `run_dir` holds no run's recipe."""
    recipe = recipe_of(run_dir)
    return None if recipe is None else resolve_base(recipe.model.base)


def at_budget(compressors: list[ComponentSpec], budget: int, visual: int, dims) -> list[ComponentSpec] | None:
    """The run's compressors set to keep `budget` of `visual` tokens per image, through each
    class's `budget_params`; None when none of them can (the run has one token count) or the
    run already keeps that many."""
    out = []
    for spec in compressors:
        params = component_class(spec.name).budget_params(budget, visual, dims) or {}
        out.append(ComponentSpec(spec.name, {**spec.params, **params}))
    return out if out != list(compressors) else None  # None too when already at that budget


def export_target(out_dir: str | Path, source: str | Path) -> Path:
    """`out_dir` (absolute) after checking, before anything is built, that an export may be
    swapped in there whole (`write_dir_atomic`: a crash leaves the folder as it was, and a former
    export is replaced, not mixed with the new one). Refused: a file, the `source` (the run,
    checkpoint or checkpoint being converted) or a folder holding it, a folder with other files."""
    out = Path(out_dir).absolute()
    source = Path(source).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder for the export")
    if out.resolve() == source or out.resolve() in source.parents:
        raise UserError(f"{out}: the export would replace {source}; give it a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(f"{out} holds files other than a vtc export: export into a new or empty folder")
    if is_export(out):  # e.g. a re-export after more training: say what goes with the old one
        reports = sorted(path.name for path in out.glob("eval.*"))
        also = f", with the evaluation report written into it ({', '.join(reports)})" if reports else ""
        print(f"[vtc] {out} holds an earlier export: replacing it whole{also}")
    return out


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a vtc export (its vtc.json says so; a vtc-written llava-hf folder's
    does not)."""
    try:
        return json.loads((folder / "vtc.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_run(
    run_dir: str | Path, out_dir: str | Path, merge: bool = False, compressor_only: bool = False
) -> Path:
    """`vtc export`: the run (or step checkpoint) rebuilt and written to `out_dir` (see
    `export_target` for what may be there already)."""
    out = export_target(out_dir, run_dir)
    if compressor_only and run_base(Path(run_dir)) == "tiny":  # before the model is rebuilt
        raise UserError(
            "--compressor-only needs a base on disk; this run's base is built from the tiny configs"
        )
    if compressor_only:
        refuse_left_out(Path(run_dir), merge)
    built, projector, compressors, base = rebuild_run(Path(run_dir))
    if merge:
        merged = merge_lora(built.model)
        print(f"[vtc] merged {merged} LoRA adapters into the base weights")
    run = measured_on(Path(run_dir))
    return write_dir_atomic(
        out, lambda tmp: export(built, tmp, projector, compressors, base, compressor_only, run)
    )


def measured_on(run_dir: Path) -> dict:
    """What `vtc evaluate` measures a run (or step checkpoint) on, for its export to be measured
    alike: {"base": the LLaVA it was attached to (a shipped base by its name, which another
    clone finds; "tiny" for one built from configs; else an absolute path), "data": its test
    data (synthetic settings, test shards as an absolute path)}."""
    from models.pretrained import shipped_path
    from train.schema import to_plain

    recipe = recipe_of(run_dir)  # there: the run was rebuilt from it
    base = recipe.model.base
    if base != "tiny" and shipped_path(base) is None:
        base = str(Path(resolve_base(base)).absolute())
    shards = recipe.data.test_shards
    return {
        "base": base,
        "data": {
            "synthetic": to_plain(recipe.data.synthetic),
            "test_shards": None if shards is None else str(Path(shards).absolute()),
        },
    }


COMPONENT_PREFIXES = ("projector.", "compressors.", "views.")  # what a `--compressor-only` export writes


def refuse_left_out(run_dir: Path, merge: bool) -> None:
    """Refuse a `--compressor-only` export that would leave out trained weights: it writes the
    components (and LoRA adapters, unmerged) and names the base for the rest, so a run that
    trained its LLM or tower in full, or whose adapters `--merge-lora` would fold into the LLM,
    would come back as another model."""
    from safetensors import safe_open

    file = run_dir / "trainable.safetensors"
    if not file.is_file():
        return  # not a finished run, or a DeepSpeed checkpoint: rebuild_run says which
    prefix = "model." if checkpoint_at(run_dir) else ""  # a checkpoint keys weights as the LightningModule
    with safe_open(str(file), "pt") as weights:
        names = [unwrapped_name(name.removeprefix(prefix)) for name in weights.keys()]
    adapters = [name for name in names if "lora_" in name]
    if merge and adapters:
        raise UserError(
            f"{run_dir}: --merge-lora folds the run's LoRA adapters into the LLM and tower weights, "
            "which --compressor-only does not write; leave out one of the two"
        )
    left_out = [n for n in names if "lora_" not in n and not n.startswith(COMPONENT_PREFIXES)]
    if left_out:
        parts = sorted({name.split(".")[0] for name in left_out})
        raise UserError(
            f"{run_dir}: the run holds {len(left_out)} trained weights outside its projector and "
            f"compressors (in its {' and '.join(parts)}, e.g. {left_out[0]}), which --compressor-only "
            "would leave out; export the whole model (without --compressor-only)"
        )
