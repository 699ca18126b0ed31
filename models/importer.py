"""Import a checkpoint in the original LLaVA layout (haotian-liu/LLaVA and the methods built on
it) as a vtc export, which `models.export.load_pretrained` loads with one call.

The original layout: `config.json` is a Llama config plus `mm_*` keys (`mm_vision_tower`,
`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, ...); the weights
(sharded `.bin` or `.safetensors`) hold the LLM as `model.layers.*` / `model.embed_tokens.*` /
`lm_head.*`, the projector as `model.mm_projector.*` and usually the CLIP tower as
`model.vision_tower.vision_tower.vision_model.*`. The image is token id -200 in LLaVA's code, not a
vocabulary entry; as transformers' own conversion does, `<image>` and `<pad>` are added to the
tokenizer and the embeddings grow to a multiple of 64 (the new rows start at the mean embedding;
`<image>`'s row is never read, the image's features replace it).

What is read besides the LLaVA-1.5 MLP (`mm_projector_type: mlp2x_gelu`):
- TokenPacker (`mm_projector_type: tokenpacker`, `scale_factor`): the authors' projector
  (`q_proj_1`, `k_proj_1`, `v_proj_1`, `ln_*_1`, `clip_attn`, `mlp`) into vtc's `tokenpacker`.
- DyVTE: `model.visual_gates_router.{i}.w1/w2` into vtc's `dyvte` routers. vtc has a router
  after every layer but the last (an exit after the last layer saves nothing), so the authors'
  last router is left out, and said so.
- LLaVolta keeps its setting in the command line of the authors' scripts, not in the
  checkpoint: give it as `llavolta=(layer, stride)` (e.g. (2, 8) for the heavy scheme).
- FALCON's released code (JiuTian-VL/FALCON, `model_type: jiutian`): `visual_config` (registers
  `num_vision_queries`, `anchor_max`, `enable_interactive_attn`, `feature_type` 'query'),
  `projector_config` and `processor_config` (`anchors: grid_N`, the thumbnail, the text crop
  indicators); weights `model.vision_model.{vision_queries, crop_embedding_h/w}`, each tower
  layer's `interact_attn` (ReAtten), the tower under `model.vision_model.vision_tower.`, the
  projector as `model.vision2text.*`. They become vtc's `falcon` with its grids (every
  rows × cols of at most N crops, in their order, fitted by shape match) and FALCON's crop
  indicators. FALCON-8B's prompt is its tokenizer's chat template: pass `template`.

`.bin` files are read with `torch.load(weights_only=True)` only (tensors, no code); any other
weight format is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from data.errors import UserError
from data.templates import Template, get_template
from models.build import Built, ComponentSpec, assemble
from models.export import export
from models.views import CropIndicators, MultiViewConfig

CLIP_L_336 = "clip-vit-large-patch14-336"  # LLaVA-1.5's tower: its shape ships with vtc
SHIPPED_CLIP_CONFIG = Path(__file__).parent / "configs" / "llava-1.5-7b-hf" / "config.json"
JIUTIAN = "jiutian"  # the model_type of FALCON's released code (github JiuTian-VL/FALCON)
SIGLIP_L_384 = "siglip-large-patch16-384"  # FALCON-8B's tower: its shape ships with vtc too
SHIPPED_SIGLIP_CONFIG = Path(__file__).parent / "configs" / "siglip-l-384-llama-3.1-8b" / "config.json"
FALCON_NAMES = {  # FALCON's released code (model_type "jiutian") → vtc's `falcon`
    "model.vision_model.vision_queries": "registers",
    "model.vision_model.crop_embedding_h.weight": "crop_row.weight",
    "model.vision_model.crop_embedding_w.weight": "crop_col.weight",
}
TOKENPACKER_NAMES = {  # the authors' projector → vtc's tokenpacker
    "q_proj_1.": "query_proj.0.",
    "ln_q_1.": "query_proj.1.",
    "k_proj_1.0.": "key_proj.0.",
    "k_proj_1.2.": "key_proj.2.",
    "ln_k_1.": "key_proj.3.",
    "v_proj_1.0.": "value_proj.0.",
    "v_proj_1.2.": "value_proj.2.",
    "ln_v_1.": "value_proj.3.",
    "clip_attn.": "attention.",
    "mlp.0.": "output.0.",
    "mlp.2.": "output.2.",
}


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's `*.safetensors` or `*.bin` shards."""
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("*.bin"))
    if not safetensors and not bins:
        others = sorted(p.name for p in folder.glob("*") if p.suffix in (".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" ({', '.join(others)}: not read — pickled files can run code)" if others else ""
        raise UserError(f"{folder}: no *.safetensors or *.bin weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors or bins:
        if path.suffix == ".safetensors":
            try:
                tensors.update(load_file(str(path)))
            except Exception as error:  # noqa: BLE001  (a damaged or cut-short download: say which)
                raise UserError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
            continue
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (an unsafe or broken pickle: say which file)
            raise UserError(
                f"{path}: not a plain tensor checkpoint ({type(error).__name__}: {error})"
            ) from None
        if not isinstance(shard, dict):
            raise UserError(f"{path}: holds a {type(shard).__name__}, not a state dict")
        tensors.update(shard)
    return tensors


def vision_config(original: dict, vision_tower: Path | None):
    """The CLIP tower's config: from --vision-tower, or the shipped CLIP-L/336 shape."""
    if vision_tower is not None:
        config = AutoConfig.from_pretrained(vision_tower)
        return getattr(config, "vision_config", config)
    name = str(original.get("mm_vision_tower", ""))
    for known, shipped in ((CLIP_L_336, SHIPPED_CLIP_CONFIG), (SIGLIP_L_384, SHIPPED_SIGLIP_CONFIG)):
        if name.rstrip("/").endswith(known):
            return LlavaConfig.from_pretrained(shipped.parent).vision_config
    raise UserError(
        f"the checkpoint's vision tower is {name!r}: give its local folder with --vision-tower DIR "
        "(vtc knows the shapes of CLIP-L/336 and SigLIP-L/384 only)"
    )


def llava_config(original: dict, vision, image_token: int, vocab: int) -> LlavaConfig:
    # rope_theta and rope_scaling (Llama-3's) are read by LlamaConfig into its rope_parameters,
    # which is the only rope key of its own to_dict: without them the LLM would get the default
    text_keys = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling"}
    text = LlamaConfig(
        **{k: v for k, v in original.items() if k in text_keys and not k.startswith("mm_") and v is not None}
    )
    text.vocab_size = vocab
    select = original.get("mm_vision_select_feature", "patch")
    return LlavaConfig(
        vision_config=vision.to_dict() | {"model_type": vision.model_type},
        text_config=text.to_dict() | {"model_type": "llama"},
        image_token_index=image_token,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
    )


def falcon_layout(original: dict, tensors: dict[str, torch.Tensor]):
    """A checkpoint of FALCON's released code (`model_type: jiutian`) in the original LLaVA
    names: (config with LLaVA's mm_* keys, tensors renamed, FALCON's own weights under vtc's
    `compressors.0.` names, the `falcon` spec, the views). Its config's `visual_config`,
    `projector_config` and `processor_config` give the registers, the grids and the indicators."""
    visual = original.get("visual_config") or {}
    processor = original.get("processor_config") or {}
    projector = (original.get("projector_config") or {}).get("projector_type", "linear")
    if visual.get("feature_type", "patch") != "query":
        raise UserError(
            f"visual_config.feature_type {visual.get('feature_type', 'patch')!r}: a FALCON checkpoint "
            "passes its registers to the LLM ('query')"
        )
    if not processor.get("add_global_img", True):
        raise UserError("processor_config.add_global_img false: vtc's views always start with the thumbnail")
    anchors = str(processor.get("anchors", "grid_9"))
    if not (match := re.fullmatch(r"grid_(\d+)", anchors)):
        raise UserError(f"processor_config.anchors {anchors!r}: vtc reads FALCON's grid_N anchors")
    most = int(match.group(1))
    # the authors' candidate order (the first of equal scores wins, in their code and in vtc's)
    grids = tuple((rows, n // rows) for n in range(1, most + 1) for rows in range(1, n + 1) if n % rows == 0)
    anchor_max, largest_side = int(visual.get("anchor_max", 9)), max(max(g) for g in grids)
    if anchor_max != largest_side:
        raise UserError(
            f"visual_config.anchor_max {anchor_max} is not the largest side of {anchors} "
            f"({largest_side}): the thumbnail's crop embedding would differ"
        )
    rename, falcon = {}, {}
    for key, value in tensors.items():
        if key in FALCON_NAMES:
            falcon[FALCON_NAMES[key]] = value
        elif match := re.fullmatch(
            r"model\.vision_model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.interact_attn\.(.+)",
            key,
        ):
            falcon[f"reatten.{match.group(1)}.{match.group(2)}"] = value
        elif key.startswith("model.vision_model.vision_tower."):
            rename["model.vision_tower.vision_tower." + key[len("model.vision_model.vision_tower.") :]] = (
                value
            )
        elif key.startswith("model.vision2text."):
            rename["model.mm_projector." + key[len("model.vision2text.") :]] = value
        elif key.startswith("model.vision_model."):
            raise UserError(f"unexpected weight {key!r}: not in FALCON's released layout")
        else:
            rename[key] = value
    if "registers" not in falcon:
        raise UserError("no model.vision_model.vision_queries: not a FALCON checkpoint with its registers")
    reatten = bool(visual.get("enable_interactive_attn", True))
    registers = falcon["registers"].shape[1]
    spec = ComponentSpec("falcon", {"registers": registers, "anchor_max": anchor_max, "reatten": reatten})
    siglip = "siglip" in str(visual.get("model_name_or_path", "")).lower()
    config = original | {
        "mm_vision_tower": visual.get("model_name_or_path", ""),
        "mm_projector_type": projector,
        # what the uncompressed rows read: SigLIP's last layer, every token (it has no CLS)
        "mm_vision_select_layer": -1 if siglip else -2,
        "mm_vision_select_feature": "cls_patch" if siglip else "patch",
    }
    views = MultiViewConfig(
        grids,
        newline=False,
        indicators=CropIndicators() if processor.get("add_textual_crop_indicator", True) else None,
        fit="shape_match",
    )
    weights = {f"compressors.0.{k}": v for k, v in falcon.items()}
    return config, rename, weights, spec, views


def tower_names(tower: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The tower's weights under the llava-hf model's names: `model.vision_tower.` + their own,
    without the `vision_model.` level where this transformers' tower has none (SigLIP)."""
    out = {}
    for key, value in tower.items():
        name = f"model.vision_tower.{key}"
        if name not in expected and key.startswith("vision_model."):
            name = f"model.vision_tower.{key[len('vision_model.') :]}"
        out[name] = value
    return out


def split_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict, list[str]]:
    """(llava-hf weights, projector weights by their own names, router weights by index, tower
    weights, keys left out) from the original names."""
    hf, projector, routers, tower, dropped = {}, {}, {}, {}, []
    for key, value in tensors.items():
        if key.endswith(".inv_freq") or key == "model.image_newline":
            dropped.append(key)
        elif key.startswith("model.mm_projector."):
            projector[key[len("model.mm_projector.") :]] = value
        elif key.startswith("model.vision_tower.vision_tower."):
            tower[key[len("model.vision_tower.vision_tower.") :]] = value
        elif match := re.match(r"model\.visual_gates_router\.(\d+)\.(w1|w2)\.weight$", key):
            routers[(int(match.group(1)), match.group(2))] = value
        elif key.startswith("model."):
            hf["model.language_model." + key[len("model.") :]] = value
        elif key.startswith("lm_head."):
            hf[key] = value
        else:
            raise UserError(f"unexpected weight {key!r}: not the original LLaVA layout")
    return hf, projector, routers, tower, dropped


def tokenpacker_weights(projector: dict) -> dict:
    out = {}
    for key, value in projector.items():
        prefix = next((p for p in TOKENPACKER_NAMES if key.startswith(p)), None)
        if prefix is None:
            raise UserError(f"model.mm_projector.{key}: not a weight of the authors' TokenPacker")
        out[TOKENPACKER_NAMES[prefix] + key[len(prefix) :]] = value
    return out


def grow_embeddings(hf: dict, vocab: int) -> None:
    """Embedding and lm_head rows for the added tokens, at the mean of the existing rows."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        weight = hf[key]
        if weight.shape[0] < vocab:
            extra = weight.float().mean(0, keepdim=True).expand(vocab - weight.shape[0], -1).to(weight.dtype)
            hf[key] = torch.cat([weight, extra])


def import_llava(
    source: str | Path,
    out: str | Path,
    vision_tower: str | Path | None = None,
    llavolta: tuple[int, int] | None = None,
    template: Template | None = None,
) -> tuple[Path, list[str]]:
    """Convert `source` (original LLaVA layout) into a vtc export at `out`; returns (out, notes).
    `template`: the prompt format the checkpoint was tuned with (default vicuna_v1, LLaVA-1.5's),
    recorded in the export for its evaluation."""
    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise UserError(f"{source}: no config.json")
    original = json.loads(config_path.read_text())
    tensors = read_weights(source)
    falcon_weights, compressors, views = {}, [], None
    if original.get("model_type") == JIUTIAN:
        try:
            original, tensors, falcon_weights, spec, views = falcon_layout(original, tensors)
        except UserError as err:
            raise UserError(f"{config_path}: {err}") from None
        compressors.append(spec)
    if "mm_projector_type" not in original and "mm_vision_tower" not in original:
        hint = " (it is already llava-hf: use it as model.base)" if "text_config" in original else ""
        raise UserError(f"{config_path}: no mm_* keys, not a checkpoint in the original LLaVA layout{hint}")
    notes = []
    hf_weights, projector, routers, tower, dropped = split_weights(tensors)
    # a Llama config, so the tokenizer is not looked up through config.json's model_type, which
    # transformers does not know (llava_llama, jiutian)
    tokenizer = AutoTokenizer.from_pretrained(source, config=LlamaConfig())
    template = template or get_template("vicuna_v1")
    template.check(tokenizer)  # e.g. `chat` with a tokenizer that has no chat template
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vocab = -(-len(tokenizer) // 64) * 64  # as transformers' conversion pads it
    vocab = max(vocab, hf_weights["model.language_model.embed_tokens.weight"].shape[0])
    vision = vision_config(original, Path(vision_tower) if vision_tower else None)
    if not tower:
        if vision_tower is None:
            raise UserError(
                "the checkpoint holds no vision tower weights: give the tower's local folder with --vision-tower DIR"
            )
        tower = {k: v for k, v in read_weights(Path(vision_tower)).items() if k.startswith("vision_model.")}
    size = (original.get("processor_config") or {}).get("image_size", vision.image_size)
    if falcon_weights and size != vision.image_size:
        raise UserError(
            f"{config_path}: processor_config.image_size {size}, but the tower takes {vision.image_size}"
        )
    if vision.model_type == "siglip_vision_model":  # its pooling head (never read) only if saved
        vision.vision_use_head = any(".head." in f".{k}" for k in tower)
    config = llava_config(original, vision, tokenizer.convert_tokens_to_ids("<image>"), vocab)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    grow_embeddings(hf_weights, vocab)

    kind = original.get("mm_projector_type", "linear")
    if kind == "mlp2x_gelu":
        projector_spec = ComponentSpec("mlp2x_gelu")
        hf_weights.update(
            {
                f"model.multi_modal_projector.linear_{1 + int(k[0]) // 2}{k[1:]}": v
                for k, v in projector.items()
            }
        )
        component_weights = {}
    elif kind == "tokenpacker" or "q_proj_1.weight" in projector:
        projector_spec = ComponentSpec("tokenpacker", {"scale": int(original.get("scale_factor", 2))})
        component_weights = {f"projector.{k}": v for k, v in tokenpacker_weights(projector).items()}
    else:
        raise UserError(f"mm_projector_type {kind!r}: vtc imports mlp2x_gelu and tokenpacker")
    component_weights |= falcon_weights
    if routers:
        layers = 1 + max(i for i, _ in routers)
        hidden = routers[(0, "w1")].shape[0]
        compressors.append(ComponentSpec("dyvte", {"hidden": hidden}))
        for (index, name), value in routers.items():
            if index < layers - 1:
                component_weights[f"compressors.0.routers.{index}.{0 if name == 'w1' else 2}.weight"] = value
        notes.append(
            f"DyVTE: routers of layers 0..{layers - 2} imported; the last layer's router has no vtc counterpart"
        )
    if llavolta is not None:
        layer, stride = llavolta
        phase = {"layer": layer, "stride": stride}
        compressors.append(ComponentSpec("llavolta", {"schedule": [phase], "inference": phase}))
    notes += [f"left out {key}" for key in dropped if not key.endswith(".inv_freq")]

    dtype = hf_weights["model.language_model.embed_tokens.weight"].dtype
    # every weight is loaded from the checkpoint below (or the import fails): drawing a 7B
    # model's random ones first would take minutes
    with no_init_weights():
        hf = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    expected = set(hf.state_dict())
    hf_weights.update(tower_names(tower, expected))
    if kind != "mlp2x_gelu":  # the llava-hf part's own projector is not used: it starts fresh
        expected -= {k for k in expected if k.startswith("model.multi_modal_projector.")}
        hf.model.multi_modal_projector.apply(hf._init_weights)
    missing, unexpected = expected - set(hf_weights), set(hf_weights) - set(hf.state_dict())
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    hf.load_state_dict(hf_weights, strict=False)
    model = assemble(
        hf,
        projector_spec,
        compressors,
        reinit_projector=kind != "mlp2x_gelu",
        views=views,
        tokenizer=tokenizer,
    )
    if component_weights:
        result = model.load_state_dict(component_weights, strict=False)
        unset = [k for k in result.missing_keys if k.startswith(("projector.", "compressors."))]
        if kind == "mlp2x_gelu":
            unset = [k for k in unset if not k.startswith("projector.")]  # taken from the base
        if falcon_weights and not compressors[0].params["reatten"]:  # stays the copy `attach` made
            unset = [k for k in unset if not k.startswith("compressors.0.reatten.")]
        if result.unexpected_keys or unset:
            raise UserError(
                f"{source}: the imported weights do not fit vtc's components: unexpected "
                f"{result.unexpected_keys[:3]}, missing {unset[:3]}"
            )
    built = Built(model, hf, tokenizer, template)
    return export(built, out, projector_spec, compressors, base=None), notes
