"""Recipes: YAML → typed, frozen config objects, validated before any model is built.

Every problem (unknown key, wrong type, impossible combination) is reported at once, each with
the recipe file and the dotted key. Components are named by registry names; their parameters are
checked against the component's own Config. `key=value` overrides apply before validation.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from data.errors import UserError
from data.synth import (
    ASKED,
    EXTRA_FAMILIES,
    FAMILIES,
    OBJECTS,
    TRAINING_ONLY,
    crowd_problem,
    families_problem,
)
from data.templates import Template, get_template, read_jinja
from models.build import ComponentSpec
from models.compressors import available, baselines, component_class, config_fields, unknown_name_message
from models.compressors.base import ModelDims
from models.pretrained import shipped_names, shipped_path, verify
from models.tiny import TinyConfig
from models.views import MultiViewConfig
from train.objectives import OBJECTIVES, declared_aux_losses, loss_terms
from train.schema import (
    AtLeast0,
    AtLeast1,
    Fraction,
    NonNegative,
    Positive,
    Probability,
    Problem,
    Range,
    parse_dataclass,
    to_plain,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "tiny" / "tokenpacker.yaml"  # the main job: `vtc train`
BASE_RECIPE = RECIPES_DIR / "tiny" / "base.yaml"  # trained the shipped base, tiny-llava

Mode = Literal["frozen", "full", "lora"]
TemplateName = Literal["plain", "vicuna_v1", "chat"]
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
Seed = Annotated[int, Range(0, 2**32 - 1)]  # what numpy's and Lightning's seeding accept


@dataclass(frozen=True)
class ModelRecipe:
    base: str = "tiny"  # "tiny", a llava-hf directory, or "run:NAME" (checkpoints/NAME/hf)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    projector: ComponentSpec = field(default_factory=lambda: ComponentSpec("mlp2x_gelu"))
    compressors: list[ComponentSpec] = field(default_factory=list)
    # A run directory or a trainable.safetensors: its weights load into the model before training
    # (e.g. stage 2 starting from the projector that stage 1 trained).
    init: str | None = None
    # Start the projector from scratch even when the base has one (fair baselines for compressors).
    reinit_projector: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Images as a thumbnail + a grid of crops, for any projector and compressors (models/views.py).
    views: MultiViewConfig | None = None
    # For stages with `template: chat` (the tokenizer's own chat template): the system prompt
    # every conversation starts with (None: none, or whatever the template adds itself), and a
    # Jinja file that replaces the tokenizer's template (None: the tokenizer's).
    system_prompt: str | None = None
    chat_template: str | None = None

    @property
    def plain_llava(self) -> bool:
        """The model is a LLaVA as llava-hf writes one (its MLP projector on one view, no
        component): a run of it saves RUN/hf, which is then the model `vtc evaluate` measures."""
        return self.projector.name == "mlp2x_gelu" and not self.compressors and self.views is None


@dataclass(frozen=True)
class SyntheticData:
    train: AtLeast1 = 20000
    val: AtLeast0 = 200
    test: AtLeast1 = 500
    seed: Seed = 0
    image_size: Annotated[int, Range(8)] = 64
    grid: Annotated[int, Range(1, 8)] = 4  # cells per side: names a1..h8
    # Fewest and most shapes per scene (besides the dot): more crowd each crop of a multi-view
    # image, so a compressor that keeps few tokens per view must choose what to keep.
    objects: tuple[AtLeast1, AtLeast1] = OBJECTS
    # The kinds of question each image is asked: scored families and the training-only lookups
    # (data/synth.py). `match` (the shape of the object of the dot's colour) is asked only here.
    families: tuple[Literal[FAMILIES + EXTRA_FAMILIES + TRAINING_ONLY], ...] = ASKED


@dataclass(frozen=True)
class DataRecipe:
    synthetic: SyntheticData | None = field(default_factory=SyntheticData)
    train_shards: str | None = None  # folder of shards (vtc data convert); replaces synthetic
    test_shards: str | None = None
    max_length: AtLeast1 = 512
    # Keep only the first N question-answer turns of every conversation (None: all of them):
    # `turns: 1` makes single-turn samples, as DyVTE's authors train on, from multi-turn data.
    turns: AtLeast1 | None = None
    num_workers: AtLeast0 = 1
    cache_dir: str = "checkpoints/data"  # synthetic shards; a relative path is from the working directory


@dataclass(frozen=True)
class LoraRecipe:
    r: AtLeast1 = 128
    alpha: AtLeast1 = 256
    dropout: Probability = 0.05


@dataclass(frozen=True)
class Freeze:
    vision: Mode = "frozen"
    projector: Mode = "full"
    compressors: Mode = "full"
    llm: Mode = "frozen"


@dataclass(frozen=True)
class Optim:
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    warmup: Fraction = 0.03  # fraction of the stage's steps
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    grad_clip: Positive | None = 1.0


@dataclass(frozen=True)
class Stage:
    name: str
    objective: str = "lm"  # a name in train.objectives.OBJECTIVES
    loss_weights: dict[str, NonNegative] = field(default_factory=dict)  # per term; 1.0 if not named
    # One template, or a list: every sample once per template, shuffled together (e.g. dense
    # captions mixed into instruction tuning).
    # `chat` is the tokenizer's chat template, with model.system_prompt and model.chat_template.
    template: TemplateName | list[TemplateName] = "vicuna_v1"
    train: Freeze = field(default_factory=Freeze)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    optim: Optim = field(default_factory=Optim)
    # Settings of the model's components for this stage only, by component name (e.g.
    # `falcon: {reatten: false}`): the fields a component lists in `stage_settings`.
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    # With model.views: false trains this stage on whole images (one view each: the thumbnail,
    # fitted by model.views.fit), as FALCON's first stage trains on the global view only.
    views: bool = True
    steps: AtLeast1 | None = None
    epochs: Positive | None = None
    batch_size: AtLeast1 = 16  # per device
    global_batch_size: AtLeast1 | None = None  # batch_size × devices × nodes × accumulation

    def template_names(self) -> list[str]:
        return [self.template] if isinstance(self.template, str) else list(self.template)


@dataclass(frozen=True)
class GradientCheckpointing:
    """Recompute activations in backward instead of keeping them (LLaVA-1.5 trains this way)."""

    llm: bool = False  # every decoder layer
    vision: bool = False  # every vision-encoder layer (only matters when the tower trains)


@dataclass(frozen=True)
class TrainerRecipe:
    strategy: Literal["auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: AtLeast1 = 1
    num_nodes: AtLeast1 = 1
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    log_every: AtLeast1 = 10
    threads: AtLeast1 | None = None  # torch CPU threads; None = leave as is
    record_samples: bool = False  # write each rank's seen sample ids + final weight digest
    # A non-finite loss stops the run (the last checkpoint stays the last good one), or with
    # `skip` that batch is left out (no backward, no optimizer step) and counted. Single device.
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    gradient_checkpointing: GradientCheckpointing = field(default_factory=GradientCheckpointing)


@dataclass(frozen=True)
class CheckpointRecipe:
    every: AtLeast1 = 50  # optimizer steps between saves; the last step of every stage is saved too
    keep_last: AtLeast1 = 2  # newest checkpoints kept (over all stages)


@dataclass(frozen=True)
class EvalRecipe:
    # Score the run on the held-out test split after training (metrics.json). A recipe without
    # test data (real shards and no data.test_shards) sets this false and evaluates with
    # `vtc evaluate --questions` or lmms-eval instead.
    after_training: bool = True
    limit: AtLeast1 | None = None  # test images (each asked every question)
    batch_size: AtLeast1 = 64
    max_new_tokens: AtLeast1 = 8  # a grounded answer: up to 5 cells, " . ", the answer, </s>
    # After training, compare the run with its base and these training-free baselines at the
    # run's own visual-token count (`vtc evaluate` names): eval.json / .md / .png in the run.
    baselines: tuple[str, ...] = ()
    compare_limit: AtLeast1 | None = 200  # test images for that comparison
    compare_timing: bool = True  # measure latency, decode speed and memory there too


@dataclass(frozen=True)
class WandbRecipe:
    enabled: bool = False
    project: str = "vtc"
    mode: Literal["offline", "online"] = "offline"
    name: str | None = None


@dataclass(frozen=True)
class Recipe:
    description: str
    output: str
    stages: list[Stage]
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    trainer: TrainerRecipe = field(default_factory=TrainerRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    wandb: WandbRecipe = field(default_factory=WandbRecipe)
    checkpoint: CheckpointRecipe = field(default_factory=CheckpointRecipe)
    seed: Seed = 0
    source: str = ""  # the file it came from (set by the loader)


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  {p.key}: {p.message}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in recipe\n{lines}")


def accumulation(stage: Stage, world: int) -> int:
    """Micro-batches per optimizer step: global batch / (batch_size × devices × nodes)."""
    return (stage.global_batch_size or stage.batch_size * world) // (stage.batch_size * world)


def stage_steps_for(stage: Stage, samples: int, world: int) -> int:
    """Optimizer steps of a stage over `samples` training samples (its `steps`, or its epochs;
    the training loader drops the last partial global batch of every epoch)."""
    if stage.steps is not None:
        return stage.steps
    per_epoch = samples // (stage.batch_size * world * accumulation(stage, world))
    return max(1, math.ceil(stage.epochs * per_epoch))


# ------------------------------------------------------------------------------------ loading


def resolve_recipe_path(name: str | Path) -> Path:
    """A path, or a shipped recipe's short name (`tiny/base`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"recipe {name!r} not found (neither a file nor a shipped recipe; see `vtc recipes`)"
    )


def apply_overrides(raw: dict, overrides: list[str], problems: list[Problem]) -> dict:
    """`a.b.c=value` (value parsed as YAML; list items by index: `stages.1.steps=10`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(Problem(item, "override must look like key.path=value"))
            continue
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(Problem(here, f"override path: no item {part} in this list"))
                    break
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                problems.append(Problem(here, "override path goes through a value that is not a mapping"))
                break
        else:
            last = parts[-1]
            try:
                value = yaml.load(text, Loader=UniqueKeyLoader)
            except yaml.YAMLError as err:
                problems.append(Problem(key, f"override value {text!r} is not valid YAML: {_one_line(err)}"))
                continue
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(Problem(key, "override path does not name a key"))
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error: YAML's
    "the last one wins" silently drops the first value, usually a mistake in a long recipe."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} appears twice (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load_recipe(name: str | Path, overrides: list[str] = (), check_machine: bool = True) -> Recipe:
    path = resolve_recipe_path(name)
    source = str(path)
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise RecipeError(source, [Problem("<yaml>", _one_line(err))]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(source, [Problem("<file>", f"cannot read the recipe: {err}")]) from None
    return recipe_from_dict(raw, source, overrides, check_machine)


def recipe_from_dict(
    raw, source: str = "<dict>", overrides: list[str] = (), check_machine: bool = True
) -> Recipe:
    """Parse and check a recipe. `check_machine=False` skips what depends on this machine
    (CUDA for DeepSpeed, data folders present): a GPU recipe validates on a laptop."""
    problems: list[Problem] = []
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(
            source, [Problem("<top>", f"a recipe is a mapping of keys, got a {type(raw).__name__}")]
        )
    raw = apply_overrides(copy.deepcopy(raw), list(overrides), problems)  # the caller's dict stays as it was
    model_raw = raw.get("model") if isinstance(raw.get("model"), dict) else None
    components = _split_components(model_raw, problems) if model_raw else None
    recipe = parse_dataclass(Recipe, raw, "", problems, skip=("source",))
    if recipe is not None and components is not None:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **components))
    if recipe is not None:
        # Bad values were replaced by their defaults while parsing, so combinations can still be
        # checked; a combination that involves an already reported key is not reported again.
        recipe = dataclasses.replace(recipe, source=source)
        reported = [p.key for p in problems]
        more = check_recipe(recipe) + (check_machine_fit(recipe) if check_machine else [])
        problems += [p for p in more if not any(_overlaps(p.key, key) for key in reported)]
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _overlaps(a: str, b: str) -> bool:
    """One dotted key is the other or contains it (`stages[0]` and `stages[0].steps`)."""
    a, b = a.replace("[", ".").replace("]", ""), b.replace("[", ".").replace("]", "")
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to an equal Recipe."""
    plain = to_plain(recipe)
    plain.pop("source", None)
    flat = lambda c: {"name": c["name"], **c["params"]}  # noqa: E731  (recipes write components flat)
    plain["model"]["projector"] = flat(plain["model"]["projector"])
    plain["model"]["compressors"] = [flat(c) for c in plain["model"]["compressors"]]
    return yaml.safe_dump(plain, sort_keys=False)


def _split_components(model_raw: dict, problems: list[Problem]) -> dict:
    """Parse `projector` and `compressors` entries against each component's own Config. They are
    removed from `model_raw` (so the generic parser does not see them) and returned as Components."""
    out = {}
    if "projector" in model_raw:
        out["projector"] = _component(model_raw.pop("projector"), "model.projector", problems)
    if "compressors" in model_raw:
        entries = model_raw.pop("compressors") or []
        if not isinstance(entries, list):
            problems.append(Problem("model.compressors", "expected a list of {name: ..., <params>}"))
            entries = []
        out["compressors"] = [
            _component(e, f"model.compressors[{i}]", problems) for i, e in enumerate(entries)
        ]
    return {k: v for k, v in out.items() if v is not None and None not in (v if isinstance(v, list) else [v])}


def _component(entry, key: str, problems: list[Problem]) -> ComponentSpec | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        problems.append(Problem(key, "expected a mapping with a 'name' (a registered component)"))
        return None
    params = {k: v for k, v in entry.items() if k != "name"}
    try:
        cls = component_class(entry["name"])
    except KeyError:
        problems.append(Problem(f"{key}.name", unknown_name_message(entry["name"])))
        return None
    config = parse_dataclass(cls.Config, params, key, problems)
    if config is None:
        return None
    # Keep the params as validated plain values (typed config is rebuilt by the registry); a
    # reported bad value is its default here, as anywhere in a recipe, so the component stays
    # in the model and the checks of combinations (a stage's settings of it) still see it.
    return ComponentSpec(
        entry["name"], {f: to_plain(getattr(config, f)) for f in config_fields(entry["name"]) if f in params}
    )


# --------------------------------------------------------------------------- combinations


def base_dims(recipe: Recipe) -> ModelDims | None:
    """Model dimensions from the base's config, without building the model."""
    from models.build import dims_of
    from models.tiny import tiny_llava_config, tiny_tokenizer

    base = resolve_base(recipe.model.base)
    if base == "tiny":
        return dims_of(tiny_llava_config(recipe.model.tiny, tiny_tokenizer()))
    config_path = Path(base) / "config.json"
    if not config_path.is_file():
        return None
    from transformers import LlavaConfig

    return dims_of(LlavaConfig.from_dict(json.loads(config_path.read_text())))


def resolve_base(base: str) -> str:
    """ "tiny" stays; a shipped base's name ("tiny-llava") → its folder, checked against its
    recorded hashes; "run:NAME" → checkpoints/NAME/hf; a relative path that does not exist from
    the working directory is taken from the repository root (shipped configs)."""
    if base == "tiny":
        return base
    shipped = shipped_path(base)
    if shipped is not None:
        verify(shipped)
        return str(shipped)
    if base.startswith("run:"):
        return str(Path("checkpoints", base[4:], "hf").absolute())  # from the working directory
    path = Path(base)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return base


def stage_templates(stage: Stage, model: ModelRecipe) -> list[Template]:
    """The templates a stage's samples are encoded with, one per name in `stage.template`."""
    return [_template(name, model) for name in stage.template_names()]


def model_template(recipe: Recipe) -> Template:
    """The format the trained model answers in: the last template of the last stage that is not
    `plain` (vicuna_v1 when every stage is plain). Its evaluation and export prompt it so."""
    for stage in reversed(recipe.stages):
        for name in reversed(stage.template_names()):
            if name != "plain":
                return _template(name, recipe.model)
    return get_template("vicuna_v1")


def _template(name: str, model: ModelRecipe) -> Template:
    if name != "chat":
        return get_template(name)
    # unreadable e.g. when a run is evaluated from another folder than it trained in
    jinja = read_jinja(model.chat_template, "model.chat_template") if model.chat_template else None
    return get_template(name, model.system_prompt, jinja)


def base_has_chat_template(base: str) -> bool | None:
    """Whether the base's tokenizer carries a chat template; None where that cannot be known
    here (a run not trained yet, a shapes-only config folder without tokenizer files)."""
    if base == "tiny":
        return False
    folder = Path(resolve_base(base))
    tokenizer_config = folder / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return None
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def template_problems(recipe: Recipe) -> list[Problem]:
    """`chat` stages need a chat template; the chat settings need a `chat` stage."""
    model, problems = recipe.model, []
    chat_stages = [i for i, stage in enumerate(recipe.stages) if "chat" in stage.template_names()]
    if not chat_stages:
        for key in ("system_prompt", "chat_template"):
            if getattr(model, key) is not None:
                problems.append(
                    Problem(f"model.{key}", "only stages with template: chat use it, and none has")
                )
    elif model.chat_template is not None:
        if not Path(model.chat_template).is_file():
            problems.append(Problem("model.chat_template", f"{model.chat_template!r}: no such Jinja file"))
    elif base_has_chat_template(model.base) is False:
        problems.append(
            Problem(
                f"stages[{chat_stages[0]}].template",
                f"chat: the tokenizer of base {model.base!r} has no chat template; give "
                "model.chat_template (a Jinja file) or use vicuna_v1",
            )
        )
    return problems


def objective_problems(key: str, stage: Stage, model: ModelRecipe) -> list[Problem]:
    """An unknown objective, a weight for a term it does not have, or an objective that cannot
    reach a trainable parameter (component losses while the components that own them are frozen)."""
    if stage.objective not in OBJECTIVES:
        near = difflib.get_close_matches(stage.objective, list(OBJECTIVES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return [
            Problem(
                f"{key}.objective",
                f"unknown objective {stage.objective!r}{hint}; known: {', '.join(OBJECTIVES)}",
            )
        ]
    objective = OBJECTIVES[stage.objective]
    problems = []
    names = [model.projector.name] + [c.name for c in model.compressors]
    terms = loss_terms(objective, names)
    for term in stage.loss_weights:
        if term not in terms:
            problems.append(
                Problem(
                    f"{key}.loss_weights.{term}",
                    f"objective {stage.objective!r} has no term {term!r} here; its terms: {', '.join(terms) or 'none'}",
                )
            )
    if objective.aux:
        owners = declared_aux_losses(names)
        if not owners:
            problems.append(
                Problem(
                    f"{key}.objective",
                    f"{stage.objective!r} trains on component losses, but none of {', '.join(names)} declares any (Compressor.aux_losses)",
                )
            )
        parts = {"projector" if n == model.projector.name else "compressors" for n in owners.values()}
        if owners and not objective.lm and all(getattr(stage.train, p) == "frozen" for p in parts):
            part = sorted(parts)[0]
            problems.append(
                Problem(
                    f"{key}.train.{part}",
                    f"objective {stage.objective!r} trains only the losses of {', '.join(sorted(set(owners.values())))}, which this stage freezes: no gradient would reach a trainable weight",
                )
            )
    return problems


def stage_setting_problems(
    key: str, stage: Stage, model: ModelRecipe, dims: ModelDims | None = None
) -> list[Problem]:
    """`stages[i].components`: each names a component of the model and sets only what that
    component lets a stage set (its `stage_settings`), with values its Config accepts and, given
    the model's `dims`, its `check_config` too (the model's own values are checked on their own)."""
    problems = []
    specs = {c.name: c for c in [model.projector, *model.compressors]}
    for name, settings in stage.components.items():
        where = f"{key}.components.{name}"
        if name not in specs:
            problems.append(Problem(where, f"not a component of this model ({', '.join(specs)})"))
            continue
        cls = component_class(name)
        for setting in settings:
            if setting not in cls.stage_settings:
                allowed = ", ".join(cls.stage_settings) or "none"
                problems.append(
                    Problem(
                        f"{where}.{setting}", f"a stage cannot set it; {name} lets a stage set: {allowed}"
                    )
                )
        if all(s in cls.stage_settings for s in settings):
            unparsed = []
            config = parse_dataclass(cls.Config, {**specs[name].params, **settings}, where, unparsed)
            problems += unparsed
            if dims is not None and not unparsed:
                checked = cls.check_config(config, dims)
                problems += [Problem(f"{where}.{sub}", msg) for sub, msg in checked if sub in settings]
    if not stage.views and model.views is None:
        problems.append(
            Problem(f"{key}.views", "'views: false' needs model.views (images are single views already)")
        )
    return problems


def check_recipe(recipe: Recipe) -> list[Problem]:
    problems: list[Problem] = []
    add = lambda key, msg: problems.append(Problem(key, msg))  # noqa: E731
    model = recipe.model
    if component_class(model.projector.name).stage != "projector":
        add(
            "model.projector.name",
            f"{model.projector.name!r} is not a projector; projectors: " + ", ".join(available("projector")),
        )
    encoders = 0
    for i, comp in enumerate(model.compressors):
        stage = component_class(comp.name).stage
        if stage == "projector":
            add(f"model.compressors[{i}].name", f"{comp.name!r} is a projector: put it under model.projector")
        encoders += stage == "encoder"
    if encoders > 1:
        add("model.compressors", "at most one encoder-stage compressor can act inside the vision tower")
    if model.views is not None:
        for sub, msg in model.views.problems():
            add(f"model.views.{sub}", msg)
    base = model.base
    found = False
    try:
        found = (
            base == "tiny" or base.startswith("run:") or (Path(resolve_base(base)) / "config.json").is_file()
        )
        if not found:
            shipped = ", ".join(shipped_names()) or "none"
            add(
                "model.base",
                f"{base!r} is not 'tiny', a shipped base ({shipped}), 'run:NAME' or a llava-hf "
                "directory with config.json",
            )
    except ValueError as err:  # a shipped base whose files fail their recorded hashes
        add("model.base", str(err))
    dims = None
    try:
        dims = base_dims(recipe) if found else None  # a base already refused: one line says why
    except Exception as err:  # a malformed config.json
        add("model.base", f"cannot read the base's config: {err}")
    if dims is not None:
        for key, comp in [("model.projector", model.projector)] + [
            (f"model.compressors[{i}]", c) for i, c in enumerate(model.compressors)
        ]:
            cls = component_class(comp.name)
            for sub, msg in cls.check_config(cls.Config(**comp.params), dims):
                add(f"{key}.{sub}", msg)
    data = recipe.data
    if data.synthetic is not None and data.synthetic.image_size < 4 * data.synthetic.grid:
        add(
            "data.synthetic.image_size",
            f"must be at least 4 px per cell (4 × grid {data.synthetic.grid}), got {data.synthetic.image_size}",
        )
    if data.synthetic is not None and (problem := crowd_problem(data.synthetic.objects, data.synthetic.grid)):
        add("data.synthetic.objects", problem)
    if data.synthetic is not None and (problem := families_problem(data.synthetic.families)):
        add("data.synthetic.families", problem)
    if data.synthetic is None and not data.train_shards:
        add("data", "give either data.synthetic or data.train_shards")
    if not recipe.stages:
        add("stages", "a recipe needs at least one stage")
    if data.synthetic is None and not data.test_shards and recipe.eval.after_training:
        add(
            "data.test_shards",
            "no test data for the held-out evaluation after training: give data.test_shards, "
            "or set eval.after_training: false",
        )
    if not recipe.output.strip():
        add("output", "must name the run directory")
    world = recipe.trainer.devices * recipe.trainer.num_nodes
    names = [stage.name for stage in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        key = f"stages[{i}]"
        if not STAGE_NAME.fullmatch(stage.name):
            add(f"{key}.name", f"{stage.name!r}: use letters, digits, '-' and '_' (it names files)")
        elif names.index(stage.name) != i:
            add(f"{key}.name", f"{stage.name!r} is also the name of stages[{names.index(stage.name)}]")
        if (stage.steps is None) == (stage.epochs is None):
            add(key, "give exactly one of steps or epochs")
        problems += objective_problems(key, stage, model)
        problems += stage_setting_problems(key, stage, model, dims)
        objective = OBJECTIVES.get(stage.objective)
        if stage.loss_weights and stage.objective in OBJECTIVES:
            terms = loss_terms(
                OBJECTIVES[stage.objective], [model.projector.name] + [c.name for c in model.compressors]
            )
            if all(stage.loss_weights.get(t, 1.0) == 0 for t in terms):
                add(f"{key}.loss_weights", "every loss term has weight 0: nothing would train")
        if objective is not None and objective.region_targets:
            name = stage.objective
            if data.synthetic is not None and dims is not None and dims.grid % data.synthetic.grid:
                add(
                    "data.synthetic.grid",
                    f"{name!r} targets need the scene grid to divide the {dims.grid}×{dims.grid} patch grid, got {data.synthetic.grid}",
                )
            if data.synthetic is None:
                add(f"{key}.objective", f"{name!r} needs per-region targets, which only synthetic data has")
            if model.views is not None:
                add(
                    f"{key}.objective",
                    f"{name!r} targets are per patch of one view; it cannot train on model.views crops",
                )
            if stage.train.vision == "frozen":
                add(
                    f"{key}.train.vision",
                    f"the {name!r} objective trains the vision tower: it cannot be frozen",
                )
        if stage.train.projector == "lora" or stage.train.compressors == "lora":
            add(
                f"{key}.train",
                "projector and compressors train 'full' or stay 'frozen' (LoRA is for vision/llm)",
            )
        trainable = [m for m in dataclasses.astuple(stage.train) if m != "frozen"]
        if not trainable:
            add(f"{key}.train", "every part is frozen: nothing would train")
        if stage.global_batch_size is not None and stage.global_batch_size % (stage.batch_size * world):
            add(
                f"{key}.global_batch_size",
                f"{stage.global_batch_size} is not a multiple of batch_size "
                f"{stage.batch_size} × {world} device(s)",
            )
    if recipe.trainer.nonfinite_loss == "skip" and (world > 1 or recipe.trainer.strategy != "auto"):
        add(
            "trainer.nonfinite_loss",
            "'skip' works on a single device only (Lightning cannot skip a step on some ranks); use 'stop'",
        )
    if recipe.trainer.strategy.startswith("deepspeed") and recipe.trainer.accelerator == "cpu":
        add(
            "trainer.strategy",
            f"{recipe.trainer.strategy} cannot run with accelerator 'cpu': Lightning's "
            "DeepSpeedStrategy needs CUDA GPUs",
        )
    if recipe.trainer.strategy.startswith("deepspeed"):
        problems += part_per_step_problems(recipe)
    elif recipe.trainer.precision == "16-mixed" and model.dtype == "float16":
        add(
            "model.dtype",
            "float16 weights cannot train under 16-mixed without DeepSpeed: torch's gradient "
            "scaler refuses float16 gradients ('Attempting to unscale FP16 gradients'); use "
            "model.dtype float32 (16-bit compute, float32 weights), bfloat16 with bf16-mixed, or a "
            "deepspeed_stage_N strategy, which keeps float32 master weights",
        )
    problems += template_problems(recipe)
    known = baselines()  # the names `vtc evaluate --baselines` takes

    for i, name in enumerate(recipe.eval.baselines):
        if name not in known:
            add(f"eval.baselines.{i}", f"unknown baseline {name!r}; choose from {', '.join(known)}")
    return problems


def part_per_step_problems(recipe: Recipe) -> list[Problem]:
    """Stages that train a component learning one part of itself per step, which DeepSpeed's
    optimizer would move as a whole every step (`Compressor.trains_one_part_per_step`;
    tests/test_zero.py -k every_method measures it)."""
    problems = []
    slots = [("projector", recipe.model.projector)] + [("compressors", c) for c in recipe.model.compressors]
    for i, stage in enumerate(recipe.stages):
        for part, spec in slots:
            if (
                getattr(stage.train, part) == "frozen"
                or not component_class(spec.name).trains_one_part_per_step
            ):
                continue
            problems.append(
                Problem(
                    f"stages[{i}].train.{part}",
                    f"{spec.name} trains one part of itself per step; {recipe.trainer.strategy}'s "
                    "optimizer steps every trainable parameter every step, with a zero gradient "
                    "where a step gave none, so momentum and weight decay would move the parts the "
                    "step did not train (torch's optimizers, on one device or under DDP, leave them): "
                    "use trainer.strategy: ddp",
                )
            )
    return problems


def check_machine_fit(recipe: Recipe) -> list[Problem]:
    """What this machine must have for the recipe to run here."""
    problems = []
    cuda = torch_cuda_available()
    if recipe.trainer.strategy.startswith("deepspeed") and not cuda:
        problems.append(
            Problem(
                "trainer.strategy",
                f"{recipe.trainer.strategy} runs through Lightning's "
                "DeepSpeedStrategy, which needs CUDA GPUs; none is visible here. Use 'ddp' or "
                "'auto' on CPU (`vtc validate --anywhere` checks the recipe regardless of this machine).",
            )
        )
    if recipe.trainer.accelerator == "gpu" and not cuda:
        problems.append(Problem("trainer.accelerator", "'gpu' asked for, but no CUDA GPU is visible here"))
    if recipe.trainer.precision == "16-mixed" and not cuda:
        problems.append(
            Problem("trainer.precision", "16-mixed needs a CUDA GPU; use 32-true or bf16-mixed on CPU")
        )
    from train.launch import launch_problems

    problems += [
        Problem(key, message)
        for key, message in launch_problems(recipe.trainer.devices, recipe.trainer.num_nodes)
    ]
    out = Path(recipe.output)
    for parent in [out, *out.parents]:  # the run directory, or a folder above it, is a file
        if parent.is_file():
            problems.append(Problem("output", f"{str(parent)!r} is a file, not a folder for the run"))
            break
    for key in ("train_shards", "test_shards"):
        folder = getattr(recipe.data, key)
        if folder and not Path(folder).exists():
            problems.append(
                Problem(f"data.{key}", f"{folder!r} does not exist (create it with `vtc data convert`)")
            )
    return problems


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
