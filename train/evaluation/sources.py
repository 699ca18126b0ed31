"""Which models a `vtc evaluate` measures: what the source it was pointed at is (a run, a
recipe's run, a vtc export, a llava-hf folder) and the rows to measure beside it (the
uncompressed baseline, the model at each budget, other runs, training-free baselines)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch

from data.errors import UserError
from data.templates import Template, get_template, template_from_dict
from models.build import DTYPES, Built, ComponentSpec, build, to_precision
from models.compressors import baselines as registered_baselines
from models.compressors import component_class
from models.compressors.base import ModelDims
from models.export import FORMAT, export_base, load_pretrained


class BaseShape(NamedTuple):
    """What a source's base is shaped like, read without its weights."""

    dims: ModelDims
    visual: int  # visual tokens per image into the LLM
    image_size: int  # the side of the images its tower takes


@dataclass
class Method:
    label: str  # e.g. "baseline", "model", "fastv"
    budget: int | None  # visual tokens asked for (None: the method's own)
    make: Callable[[], Built]
    training: list[dict] | None = None  # the stages of the run that trained this model, if one did


@dataclass
class Source:
    """What `vtc evaluate` was pointed at: the model under test (None when it is the baseline
    itself), the baseline's llava-hf folder, and where the report goes by default (the source's
    folder; for a step checkpoint RUN/eval/<checkpoint>, which checkpoint rotation leaves alone)."""

    model: Callable[[], Built] | None
    base_dir: str
    out_dir: Path
    data: object  # a DataRecipe for the synthetic test split
    description: str
    # the model under test set to keep a token budget (its trained compressors' budget_params),
    # or None when its token count is fixed
    model_at: Callable[[int, int, object], Callable[[], Built] | None] | None = None
    # the model under test with its compressors left out (a run with compressors), else None
    uncompressed: Callable[[], Built] | None = None
    # the format the model under test was instruction-tuned with; every row is prompted in it
    template: Template = field(default_factory=lambda: get_template("vicuna_v1"))
    dtype: str = "float32"  # the precision (a DTYPES name) every model of this source is built in
    # a run's stages as training recorded them (`training_stages`); None for anything else
    training: list[dict] | None = None
    location: Path | None = None  # the folder the model under test is loaded from, if any
    tiny: object = None  # a TinyConfig: the sizes of a base built from configs (base_dir "tiny")

    def base(self, compressors: list[ComponentSpec] = ()) -> Built:
        """The baseline, the base's llava-hf model, with `compressors` (e.g. a training-free one)."""
        return build(self.base_dir, compressors=list(compressors), dtype=DTYPES[self.dtype], tiny=self.tiny)

    @cached_property
    def shape(self) -> BaseShape:
        """The base's shape, from a meta-device build: its config only, no weights read."""
        built = build(self.base_dir, device="meta", tiny=self.tiny)
        return BaseShape(
            built.model.dims, built.model.visual_tokens(), built.hf.config.vision_config.image_size
        )


def training_stages(run_dir: Path) -> list[dict] | None:
    """Per stage of a finished run, from its meta.json: name, optimizer steps, wall seconds and
    training samples a second (None in runs trained before vtc measured it)."""
    try:
        stages = json.loads((run_dir / "meta.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return None
    keys = ("name", "steps", "seconds", "samples_per_second")
    return [{key: stage.get(key) for key in keys} for stage in stages]


def _names_a_recipe(target: str) -> bool:
    from train.recipe import resolve_recipe_path

    try:
        resolve_recipe_path(target)
    except FileNotFoundError:
        return False
    return True


def shipped_base_named(target: str) -> str | None:
    """The name of the shipped base `target` names ("tiny-llava", as a recipe's `model.base`
    takes it) or is the folder of; None for anything else (a folder of that name elsewhere)."""
    from models.pretrained import shipped_path

    path = Path(target)
    name = path.name if path.is_dir() else target
    folder = shipped_path(name) if "/" not in name else None
    if folder is None or (path.is_dir() and folder.resolve() != path.resolve()):
        return None
    return name


def resolve_source(target: str, dtype: str = "float32", base_used: bool = True) -> Source:
    """A run directory or one of its step checkpoints, a recipe (its run), a `vtc export` folder,
    a llava-hf folder or a shipped base (by name or folder), whose models are built in `dtype` (a
    DTYPES name): loaded straight in half precision, a 7B model never takes its float32 size in
    memory. `base_used`: its base is measured or carries a training-free method, so a run on a
    base built from configs (e.g. `tiny`, untrained) is refused; without, such a run's own model
    is all that is asked for."""
    name = shipped_base_named(target)
    if name is None:
        return _resolve_source(target, dtype, base_used)
    from models.pretrained import shipped_path, verify

    folder = shipped_path(name)
    verify(folder)  # as a recipe's model.base is: the files recorded when it was shipped
    # its report goes where runs go, not into vtc's package
    out_dir = Path("checkpoints", "eval", name).absolute()
    return dataclasses.replace(
        _resolve_source(str(folder), dtype), out_dir=out_dir, description=f"shipped base {name} ({folder})"
    )


def _resolve_source(target: str, dtype: str, base_used: bool = True) -> Source:
    from train.checkpoint import checkpoint_at, unfinished_run
    from train.recipe import DataRecipe, load_recipe, model_template, resolve_base
    from train.run import is_run_dir, run_dir_of

    path = Path(target)
    if not path.is_dir():
        if not _names_a_recipe(target):
            raise FileNotFoundError(
                f"{target}: no such run directory, vtc export or llava-hf folder (nor a recipe file, "
                "shipped recipe name or shipped base name)"
            )
        recipe = load_recipe(target, check_machine=False)
        path = run_dir_of(recipe)
        if not (path / "trainable.safetensors").is_file():
            unfinished = unfinished_run(path, "evaluate {}")
            if unfinished:
                raise UserError(f"{target}: {unfinished}")
            raise FileNotFoundError(f"{target}: its run {path} is not trained yet (vtc train {target})")
    checkpoint = checkpoint_at(path)
    if is_run_dir(path) or checkpoint:
        from train.export import at_budget, rebuild_run

        root = checkpoint.run_dir if checkpoint else path
        recipe = load_recipe(root / "recipe.yaml", check_machine=False)
        # `keep_last` deletes old checkpoint folders, so a report inside one would go with it
        report_dir = root / "eval" / path.name if checkpoint else path
        own_base = path / "hf"
        template = model_template(recipe)
        # the run is itself a LLaVA base (e.g. tiny-base); a run with views wrote one too until
        # 2026-12-07, without them, so it is measured as rebuilt
        if recipe.model.plain_llava and (own_base / "config.json").is_file():
            description = f"run {path} (its llava-hf model)"
            return Source(
                None,
                str(own_base),
                report_dir,
                recipe.data,
                description,
                template=template,
                dtype=dtype,
                training=None if checkpoint else training_stages(path),
                location=path,
            )
        base = resolve_base(recipe.model.base)
        if base_used and not (Path(base) / "config.json").is_file():
            raise UserError(
                f"{path}: its base {recipe.model.base!r} is not a trained LLaVA to compare against or "
                "put a training-free method on; `--baseline none --baselines ''` measures its model alone"
            )

        def model_at(budget: int, visual: int, dims) -> Callable[[], Built] | None:
            compressors = at_budget(recipe.model.compressors, budget, visual, dims)
            return None if compressors is None else (lambda: rebuild_run(path, compressors, dtype)[0])

        uncompressed = (lambda: rebuild_run(path, [], dtype)[0]) if recipe.model.compressors else None
        return Source(
            lambda: rebuild_run(path, dtype=dtype)[0],
            base,
            report_dir,
            recipe.data,
            f"{'checkpoint' if checkpoint else 'run'} {path}",
            model_at,
            uncompressed,
            template,
            dtype,
            None if checkpoint else training_stages(path),  # a checkpoint's run trained on after it
            path,
            recipe.model.tiny,
        )
    meta_path = path / "vtc.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format") == FORMAT:
        # a whole export of a plain LLaVA (its MLP, no component, LoRA or views) is its llava-hf
        # part, a base like any other; a `--compressor-only` one is its trained projector on the
        # base it names, which is its baseline
        plain = not meta["base"] and meta["projector"]["name"] == "mlp2x_gelu"
        plain = plain and not (meta["compressors"] or meta.get("lora") or meta.get("views"))
        if plain:
            template = template_from_dict(meta.get("template"))
            data = export_data(path, meta)
            return Source(
                None, str(path), path, data, f"export {path}", template=template, dtype=dtype, location=path
            )
        return export_source(path, meta, dtype)
    if (path / "config.json").is_file():
        return Source(None, str(path), path, DataRecipe(), f"llava-hf model {path}", dtype=dtype)
    unfinished = unfinished_run(path, "evaluate {}")
    if unfinished:
        raise UserError(unfinished)
    raise FileNotFoundError(f"{target}: not a run directory, recipe, vtc export or llava-hf folder")


def export_source(path: Path, meta: dict, dtype: str) -> Source:
    """An export with a trained part beyond a llava-hf model, measured as its run was: against
    the LLaVA that run was attached to, when the export records it and it is there (else the
    export's own llava-hf part, or the base a `--compressor-only` one names), on its run's test
    data, and at every budget its compressors can keep, as `vtc evaluate RUN` measures it."""
    from train.export import at_budget
    from train.recipe import resolve_base

    def loaded(compressors=None) -> Callable[[], Built]:
        return lambda: load_pretrained(path, dtype=DTYPES[dtype], compressors=compressors)

    specs = [ComponentSpec(c["name"], c["params"]) for c in meta["compressors"]]

    def model_at(budget: int, visual: int, dims) -> Callable[[], Built] | None:
        compressors = at_budget(specs, budget, visual, dims)
        return None if compressors is None else loaded(compressors)

    base = export_base(path, meta)
    attached = (meta.get("run") or {}).get("base")
    if not meta["base"] and attached not in (None, "tiny"):
        origin = resolve_base(attached)
        if (Path(origin) / "config.json").is_file():
            base = origin
        else:
            print(
                f"[vtc] {path}: the base its run was trained on, {attached}, is not there; "
                "its baseline is the export's own LLaVA without its compressors"
            )
    return Source(
        loaded(),
        base,
        path,
        export_data(path, meta),
        f"export {path}",
        model_at,
        loaded([]) if specs else None,
        template_from_dict(meta.get("template")),
        dtype,
        location=path,
    )


def export_data(path: Path, meta: dict):
    """The test data the export's run was measured on (a DataRecipe), or vtc's default synthetic
    split for an export that records none (imported, or written before 2026-12-07)."""
    from train.recipe import DataRecipe
    from train.schema import parse_dataclass

    recorded = (meta.get("run") or {}).get("data")
    if recorded is None:
        return DataRecipe()
    problems = []
    data = parse_dataclass(DataRecipe, recorded, "run.data", problems)
    if problems:
        raise UserError(f"{path / 'vtc.json'}: {problems[0].key}: {problems[0].message}")
    return data


NO_BASELINE = "none"  # `--baseline none`: the model under test is the reference row


def baseline_row(source: Source, baseline: str | None) -> tuple[Source, Callable[[], Built] | None]:
    """(the source whose base the training-free baselines go on, what makes the baseline row's
    model or None for no such row) for `--baseline`: None, `source`'s base; NO_BASELINE, no
    row; else another source, its model as `vtc evaluate` measures it (or itself, a base)."""
    if baseline is None:
        return source, source.base
    if baseline == NO_BASELINE:
        if source.model is None:
            raise UserError(
                f"--baseline {NO_BASELINE}: {source.description} is a base, with no model to measure"
            )
        return source, None
    try:
        other = resolve_source(baseline, source.dtype)
    except FileNotFoundError as err:
        raise UserError(f"--baseline: {err}") from None
    size, own = other.shape.image_size, source.shape.image_size
    if size != own:  # every row is asked the same questions on the same pixels
        raise UserError(
            f"--baseline {baseline}: its tower takes {size} px images, {source.description}'s {own} px"
        )
    return other, other.model or other.base


@dataclass(frozen=True)
class SettingAtTest:
    """`--setting NAME.KEY=VALUE`: the model under test with one behaviour of its component
    NAME changed at test time (a key the component lists in `stage_settings`, which changes no
    weight), e.g. `falcon.reatten=false`: what ReAtten adds to a model trained with it."""

    component: str
    key: str
    value: object
    text: str

    @classmethod
    def parse(cls, text: str) -> SettingAtTest:
        import yaml

        name_key, sep, raw = text.partition("=")
        name, dot, key = name_key.strip().partition(".")
        if not (sep and dot and name and key):
            raise UserError(f"--setting {text!r}: give COMPONENT.KEY=VALUE, e.g. falcon.reatten=false")
        try:
            component = component_class(name)
        except KeyError as err:
            raise UserError(f"--setting {text!r}: {err.args[0]}") from None
        if key not in component.stage_settings:
            settable = ", ".join(component.stage_settings) or "none"
            raise UserError(f"--setting {text!r}: {name} can change at test time: {settable}")
        return cls(name, key, yaml.safe_load(raw), f"{name}.{key}={raw.strip()}")

    def check(self, dims) -> None:
        """UserError if the value has the wrong type, or the component's own checks refuse it
        (on the model's `dims`)."""
        from train.schema import parse_dataclass

        component, typed = component_class(self.component), []
        config = parse_dataclass(component.Config, {self.key: self.value}, self.key, typed)
        problems = [p.message for p in typed]
        if config is not None and not problems:
            problems = [msg for sub, msg in component.check_config(config, dims) if sub == self.key]
        if problems:
            raise UserError(f"--setting {self.text}: {problems[0]}")

    def apply(self, built: Built) -> Built:
        """`built` with this setting applied to each of its components of that name."""
        found = [c for c in built.model.compressors if c.registry_name == self.component]
        if not found:
            raise UserError(f"--setting {self.text}: the model under test has no {self.component}")
        for component in found:
            component.config = dataclasses.replace(component.config, **{self.key: self.value})
        return built

    def applied(self, make: Callable[[], Built]) -> Callable[[], Built]:
        """`make` with this setting applied (`apply`) to what it builds."""
        return lambda: self.apply(make())


def baseline_at(name: str, budget: int, visual: int, dims) -> ComponentSpec | None:
    """Registered baseline component `name` set to keep exactly `budget` of `visual` visual
    tokens, or None when it cannot."""
    params = component_class(name).budget_params(budget, visual, dims)
    return None if params is None else ComponentSpec(name, params)


def compare_labels(compare: list[str], taken: set[str] = frozenset()) -> list[str]:
    """A row label per `--compare` source: its folder's name, with as many folders above it as
    tell it from the others and from the labels `taken` (rows, and their answer files, are
    named by label: two runs' `final/` would otherwise be one row name and one file)."""
    parts = [Path(other).resolve().parts[1:] for other in compare]  # the root is no name
    twice = next((other for i, other in enumerate(compare) if parts[i] in parts[:i]), None)
    if twice is not None:
        raise UserError(f"--compare: {twice} given twice")
    depth = [1] * len(compare)
    while True:
        labels = ["/".join(p[-d:]) or other for p, d, other in zip(parts, depth, compare, strict=True)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 or label in taken]
        growing = [i for i in clashing if depth[i] < len(parts[i])]
        if not growing:
            return labels
        for i in growing:
            depth[i] += 1


def methods_for(
    source: Source,
    baselines: list[str],
    budgets: list[int],
    baseline: Callable[[], Built] | None,
    compare: list[str] = (),
    uncompressed: bool = False,
    test_settings: list[SettingAtTest] = (),
    baseline_source: Source | None = None,
) -> list[Method]:
    """The rows to measure; `baseline` makes the baseline row's model (None: no baseline row);
    `compare`: other runs or exports measured beside it (labelled by their folder names,
    `compare_labels`);
    `uncompressed`: the model under test also with its compressors left out; `test_settings`:
    the model under test again with each setting (a row `model[NAME.KEY=VALUE]`);
    `baseline_source`: the source whose base the training-free baselines go on (default `source`)."""
    baseline_source = baseline_source or source
    # a vtc run trained the baseline row when `--baseline` names a run, or when the source is a
    # run that trained a base (its own llava-hf model); not when it is the base a run started from
    trained = baseline_source.training if baseline_source is not source or source.model is None else None
    methods = [Method("baseline", None, baseline, trained)] if baseline is not None else []
    if source.model is not None:
        methods.append(Method("model", None, source.model, source.training))
        for budget in budgets if source.model_at is not None else ():
            make = source.model_at(budget, source.shape.visual, source.shape.dims)
            if make is not None:  # a trained pruner evaluated at every budget
                methods.append(Method("model", budget, make))
    if uncompressed:
        if source.uncompressed is None:
            raise UserError("--uncompressed needs a run whose recipe has compressors")
        methods.append(Method("model-uncompressed", None, source.uncompressed))
    for setting in test_settings:
        if source.model is None:
            raise UserError(f"--setting {setting.text}: {source.description} has no components to set")
        methods.append(Method(f"model[{setting.text}]", None, setting.applied(source.model)))
    for other, label in zip(compare, compare_labels(compare, {m.label for m in methods}), strict=True):
        found = resolve_source(other, source.dtype)
        make = found.model or found.base
        methods.append(Method(label, None, make, found.training))
    known = registered_baselines()
    dims, visual, _ = baseline_source.shape
    for label in baselines:
        if label not in known:
            raise UserError(f"--baselines: unknown {label!r}; choose from {', '.join(known)}")
        name = known[label]
        for budget in budgets:
            spec = baseline_at(name, budget, visual, dims)
            if spec is None:
                why = f"the base has only {visual}" if budget >= visual else "not a count it can keep exactly"
                print(f"[vtc] {label} at {budget} of {visual} visual tokens: {why}; left out")
                continue
            methods.append(Method(label, budget, lambda spec=spec: baseline_source.base([spec])))
    return methods


def model_for(
    target: str, compressor: str | None = None, tokens: int | None = None, dtype: str = "float32"
) -> Built:
    """One model as `vtc evaluate` builds its rows (for callers that evaluate one at a time, e.g.
    the lmms-eval plugin): `target` itself (a run, recipe, vtc export, llava-hf folder or shipped
    base); with `tokens`, a trained pruner set to keep that many; with `compressor` (a
    `--baselines` label or a component name), the uncompressed baseline with that training-free
    method at `tokens`; built in `dtype` (a DTYPES name)."""
    source = resolve_source(target, dtype, base_used=compressor is not None)
    built = _model_of(source, target, compressor, tokens)
    built.template = source.template  # prompted as `vtc evaluate` prompts every row of this source
    return built


def placed_model(
    target: str,
    compressor: str | None = None,
    tokens: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    template: Template | None = None,
    settings: list[str] = (),
) -> tuple[Built, torch.device]:
    """`model_for` ready to answer: on `device` (None: cuda when there is one, else cpu) in `dtype`
    (a DTYPES name, or "auto": float16 on a GPU, float32 on a CPU), both checked before any
    weights load, in eval mode; `template` replaces the prompt format the source records (e.g.
    for a llava-hf folder of a chat LLaVA); `settings` ("NAME.KEY=VALUE", `SettingAtTest`)
    change its components' behaviour. Returns the model and its device."""
    from train.evaluation.measure import dtype_for, placement

    place, torch_dtype = placement(device, dtype)
    changed = [SettingAtTest.parse(text) for text in settings]  # refused before any weights load
    built = model_for(target, compressor, tokens, dtype_for(dtype, place))
    for setting in changed:
        setting.check(built.model.dims)
        setting.apply(built)
    if template is not None:
        built.template = template
    to_precision(built.model, torch_dtype, place).eval()
    return built, place


def _model_of(source: Source, target: str, compressor: str | None, tokens: int | None) -> Built:
    if compressor is None and tokens is None:
        return (source.model or source.base)()
    dims, visual, _ = source.shape
    if tokens is None:
        raise UserError(f"compressor {compressor!r} needs a count of visual tokens to keep (tokens)")
    if compressor is None:
        make = source.model_at(tokens, visual, dims) if source.model_at is not None else None
        if make is None:
            raise UserError(
                f"{target}: its visual-token count is fixed; a count to keep (tokens) needs a trained "
                "pruner, or a training-free compressor put on it"
            )
        return make()
    name = registered_baselines().get(compressor, compressor)
    try:
        cls = component_class(name)
    except KeyError as err:
        raise UserError(f"compressor {compressor!r}: {err.args[0]}") from None
    if not cls.baseline:
        raise UserError(
            f"compressor {compressor!r}: not a training-free baseline (vtc evaluate --baselines lists them)"
        )
    spec = baseline_at(name, tokens, visual, dims)
    if spec is None:
        raise UserError(f"compressor {compressor!r}: cannot keep exactly {tokens} of {visual} visual tokens")
    return source.base([spec])
