"""Build a VtcLlava from a base (the tiny configs or a local llava-hf directory) + components.

The base is always an HF `LlavaForConditionalGeneration`; vtc wraps its vision tower, language
model and lm_head (the same module objects, so `save_pretrained` of the HF model saves what vtc
trained) and puts the registered projector in place of `multi_modal_projector`. Nothing is
downloaded: a base is a directory on disk (or "tiny"). With device="meta" only configs are read.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from data.errors import UserError
from data.templates import Template, get_template
from models.compressors import build_component
from models.compressors.base import ModelDims
from models.llava import VtcLlava
from models.llm import LanguageModel
from models.lora import unwrapped_name
from models.tiny import TinyConfig, tiny_llava_config, tiny_tokenizer
from models.views import MultiViewConfig
from models.vision import VisionTower, prefix_tokens

# the precisions models are built and run in, by the names recipes and commands use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The files a model is loaded from (weights, configs, tokenizer), as opposed to what else a model
# or run folder holds (reports, logs, metrics): what tells whether the model changed.
MODEL_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model"}
MODEL_NAMES = {"config.json", "vtc.json", "recipe.yaml", "tokenizer.json", "tokenizer_config.json"}


def is_model_file(path: Path) -> bool:
    return path.suffix in MODEL_SUFFIXES or path.name in MODEL_NAMES


def floating_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point buffers by name (e.g. a Llama's rotary `inv_freq`)."""
    return {
        name: buffer
        for name, buffer in module.named_buffers(remove_duplicate=False)
        if buffer.is_floating_point()
    }


def restore_buffers(module: torch.nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Put back those of `kept` (`floating_buffers` taken earlier) whose precision has changed
    since, each on the device its buffer is on now; the others stay the tensors they are."""
    for name, buffer in kept.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        now = getattr(owner, attribute)
        if now.dtype != buffer.dtype:
            setattr(owner, attribute, buffer.to(now.device))


def to_precision(module: torch.nn.Module, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """`module.to(device, dtype)` for the parameters only: floating buffers move but keep their
    precision, as `from_pretrained(dtype=...)` and DeepSpeed leave them. A rotary `inv_freq`
    rounded to bfloat16 (0.4 % at most) is multiplied by the position: by position 700 some of
    LLaVA-1.5-7B's cos/sin would be out by 0.8 (`bench/half_precision.py`)."""
    kept = floating_buffers(module)
    module.to(device=device, dtype=dtype)
    restore_buffers(module, kept)
    return module


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    params: dict = field(default_factory=dict)


@dataclass
class Built:
    model: VtcLlava
    hf: LlavaForConditionalGeneration  # owns the wrapped vision tower / LLM modules
    tokenizer: object
    # the format the model was instruction-tuned with, which its evaluation prompts it in
    template: Template = field(default_factory=lambda: get_template("vicuna_v1"))


def dims_of(config: LlavaConfig) -> ModelDims:
    v, t = config.vision_config, config.text_config
    return ModelDims(
        vision_width=v.hidden_size,
        vision_layers=v.num_hidden_layers,
        vision_heads=v.num_attention_heads,
        grid=v.image_size // v.patch_size,
        llm_width=t.hidden_size,
        llm_layers=t.num_hidden_layers,
        llm_heads=t.num_attention_heads,
        prefix_tokens=prefix_tokens(v),
    )


def load_base(
    base: str,
    tiny: TinyConfig | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(hf LlavaForConditionalGeneration, tokenizer) for base "tiny" or a llava-hf directory."""
    if base == "tiny":
        tokenizer = tiny_tokenizer()
        config = tiny_llava_config(tiny or TinyConfig(), tokenizer)
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            hf = LlavaForConditionalGeneration(config)
        return to_precision(hf, dtype), tokenizer
    path = Path(base)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model base {base!r}: no config.json there (expected a llava-hf directory)")
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    if device == "meta":
        config = LlavaConfig.from_pretrained(path)
        with torch.device("meta"):
            hf = LlavaForConditionalGeneration(config)
        return to_precision(hf, dtype), tokenizer
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(
            f"model base {base!r} has a config but no weights: point model.base at a "
            "directory holding the checkpoint (config.json + *.safetensors)"
        )
    with progress_bar_for(path):
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return (hf.to(device) if device else hf), tokenizer


# weights under this size load in well under a second, so transformers' "Loading weights" bar
# for them is noise (once per row of an evaluation); a 7B's keeps it
QUIET_LOAD_BYTES = 2**30


@contextmanager
def progress_bar_for(path: Path):
    """transformers' loading bar off for the block when `path`'s weights are small."""
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    quiet = sum(f.stat().st_size for f in weights) < QUIET_LOAD_BYTES and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _has_tokenizer(path: Path) -> bool:
    return any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def assemble(
    hf: LlavaForConditionalGeneration,
    projector: ComponentSpec,
    compressors: list[ComponentSpec] = (),
    reinit_projector: bool = False,
    views: MultiViewConfig | None = None,
    tokenizer=None,
) -> VtcLlava:
    """Wrap the HF model's parts and build the registered components around them. The
    projector takes what fits from the base's trained projector unless `reinit_projector`
    (`Compressor.start_from_base_projector`: all of it for `mlp2x_gelu`).
    `views`: images enter as a thumbnail + crops (models/views.py); their crop indicators are
    tokenized with `tokenizer` (the base's)."""
    config = hf.config
    dims = dims_of(config)
    vision = VisionTower(
        hf.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy
    )
    llm = LanguageModel(hf.model.language_model, hf.lm_head)
    device = hf.lm_head.weight.device
    dtype = hf.lm_head.weight.dtype
    with torch.device(device):
        proj = build_component(projector.name, projector.params, dims)
        comps = [build_component(c.name, c.params, dims) for c in compressors]
    if device.type != "meta" and not reinit_projector:
        proj.start_from_base_projector(hf.model.multi_modal_projector)
    with torch.device(device):
        model = VtcLlava(
            vision, proj.to(dtype), llm, [c.to(dtype) for c in comps], config.image_token_index, dims, views
        )
    if model.views is not None:
        model.views.to(dtype)
    if views is not None and views.indicators is not None and device.type != "meta":  # meta never runs
        if tokenizer is None:
            raise UserError("model.views.indicators: the base has no tokenizer to write them with")
        try:
            model.views.tokenize_indicators(tokenizer)
        except ValueError as err:
            raise UserError(f"model.views.indicators: {err}") from None
    return model


def build(
    base: str,
    projector: ComponentSpec = ComponentSpec("mlp2x_gelu"),
    compressors=(),
    tiny: TinyConfig | None = None,
    device: str | None = None,
    dtype=torch.float32,
    seed: int = 0,
    reinit_projector: bool = False,
    views: MultiViewConfig | None = None,
) -> Built:
    hf, tokenizer = load_base(base, tiny, device, dtype, seed)
    model = assemble(hf, projector, list(compressors), reinit_projector, views, tokenizer)
    return Built(model, hf, tokenizer)


def save_hf(built: Built, out_dir: str | Path) -> None:
    """`save_pretrained` of the wrapped HF model and its tokenizer. An mlp2x_gelu projector is
    copied into `multi_modal_projector` first, so the folder holds the trained LLaVA model."""
    if built.model.projector.registry_name == "mlp2x_gelu":
        built.hf.model.multi_modal_projector.load_state_dict(built.model.projector.state_dict())
    # Linears wrapped by LoRA keep their weight under `.base_layer.`: save it under the plain HF
    # name; the adapters are not part of the HF model (models/export.py saves them apart).
    state = {unwrapped_name(key): value for key, value in built.hf.state_dict().items() if "lora_" not in key}
    built.hf.save_pretrained(out_dir, state_dict=state)
    if built.tokenizer is not None:
        built.tokenizer.save_pretrained(out_dir)


def save_as_llava_hf(built: Built, out_dir: str | Path) -> None:
    """Write the model in llava-hf layout (needs the mlp2x_gelu projector), with its tokenizer,
    so it loads back as a base with `build(out_dir)` or with transformers directly."""
    if built.model.projector.registry_name != "mlp2x_gelu":
        raise UserError("only a model with the mlp2x_gelu projector has a llava-hf layout")
    out_dir = Path(out_dir)
    save_hf(built, out_dir)
    (out_dir / "vtc.json").write_text(json.dumps({"format": "llava-hf", "written_by": "vtc"}, indent=1))
