"""Exported models: a self-describing folder that loads back with one call, no pickle.

    OUT/config.json, model.safetensors, tokenizer files   the LLaVA model in llava-hf layout
                                                          (absent with compressor_only)
    OUT/components.safetensors                            projector + compressors weights
                                                          (+ the views' newline token)
    OUT/lora.safetensors                                  unmerged LoRA adapters (if any)
    OUT/vtc.json                                          format, projector/compressor specs,
                                                          multi-view settings, prompt template,
                                                          LoRA settings per part, base (for
                                                          compressor_only), the run it came
                                                          from (its base and test data, what
                                                          `vtc evaluate` measures it on),
                                                          versions, tensor names and shapes

`load_pretrained(OUT)` rebuilds the same model: the llava-hf part through transformers, the
components through the registry, LoRA adapters re-injected with peft, weights from safetensors
only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.errors import UserError
from data.templates import template_from_dict
from models.build import Built, ComponentSpec, build, save_hf
from models.lora import inject_lora, lora_settings, remove_lora
from models.views import MultiViewConfig

FORMAT = "vtc-export-1"


def merge_lora(root: torch.nn.Module) -> int:
    """Fold every LoRA adapter under `root` into its base weight (peft's merge), leaving plain
    HF modules. Returns the count."""
    return remove_lora(root, merge=True)


def export(
    built: Built,
    out_dir: str | Path,
    projector: ComponentSpec,
    compressors: list[ComponentSpec],
    base: str,
    compressor_only: bool = False,
    run: dict | None = None,
) -> Path:
    """Write `built` to `out_dir`. Unmerged LoRA adapters go to lora.safetensors (the HF part gets
    the base weights); `merge_lora` first to fold them in instead. `run`: what the training run
    it comes from was measured on ({"base": the LLaVA it was attached to, "data": its test
    data}), kept so that `vtc evaluate` of the export measures what it measured of the run."""
    model = built.model
    lora = {part: s for part, m in model.parts().items() if (s := lora_settings(m)) is not None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    components.update({f"compressors.{k}": v for k, v in model.compressors.state_dict().items()})
    if model.views is not None:
        components.update({f"views.{k}": v for k, v in model.views.state_dict().items()})
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in components.items()}, str(out / "components.safetensors")
    )
    if not compressor_only:
        save_hf(built, out)
    adapters = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters() if "lora_" in k}
    if adapters:
        save_file(adapters, str(out / "lora.safetensors"))
    import transformers

    meta = {
        "format": FORMAT,
        "base": base if compressor_only else None,
        "projector": {"name": projector.name, "params": projector.params},
        "compressors": [{"name": c.name, "params": c.params} for c in compressors],
        "views": model.views.config.to_dict() if model.views is not None else None,
        "template": built.template.to_dict(),
        "lora": lora,
        "run": run,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tensors": {k: list(v.shape) for k, v in components.items()},
    }
    (out / "vtc.json").write_text(json.dumps(meta, indent=1, default=list))
    return out


def export_base(path: Path, meta: dict) -> str:
    """The llava-hf model an export's components go on: its own folder, or the base that a
    `--compressor-only` export names in vtc.json, which must still be where it was."""
    base = meta["base"]
    if base and "/" in base and not (Path(base) / "config.json").is_file():  # a folder that moved
        raise UserError(
            f"{path} holds the trained parts only; the base it goes on, {base}, is not there any "
            f'more: put that model back there, or set "base" in {Path(path) / "vtc.json"} to where it is now'
        )
    return base or str(path)


def load_pretrained(
    path: str | Path,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    compressors: list[ComponentSpec] | None = None,
) -> Built:
    """Load a folder written by `export` (or `vtc export`). `compressors`: the export's own with
    other settings (e.g. another token budget: the same names, so the same weights), or [] to
    leave them out (the trained model without compression)."""
    path = Path(path)
    meta_path = path / "vtc.json"
    if not meta_path.is_file():
        run = (path / "recipe.yaml").is_file()  # a training run's folder, not yet exported
        hint = f"; it is a training run: `vtc export {path} OUT` writes one" if run else ""
        raise FileNotFoundError(f"{path} has no vtc.json: not a vtc export{hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r}, this vtc reads {FORMAT!r}")
    projector = ComponentSpec(meta["projector"]["name"], meta["projector"]["params"])
    if compressors is None:
        compressors = [ComponentSpec(c["name"], c["params"]) for c in meta["compressors"]]
    views = meta.get("views")
    views = MultiViewConfig.from_dict(views) if views else None
    built = build(export_base(path, meta), projector, compressors, device=device, dtype=dtype, views=views)
    built.template = template_from_dict(meta.get("template"))  # vicuna_v1 in exports made before
    tensors = load_file(str(path / "components.safetensors"))
    model = built.model
    parts = [("projector.", model.projector)] + ([("compressors.", model.compressors)] if compressors else [])
    for prefix, module in parts + ([("views.", model.views)] if views else []):
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)
    lora = meta.get("lora") or {}  # vision and LLM only (a recipe refuses LoRA on the components)
    if lora:
        for part, settings in lora.items():
            inject_lora(model.parts()[part], part, **settings)
        adapters = load_file(str(path / "lora.safetensors"))
        missing = {k for k, _ in model.named_parameters() if "lora_" in k} ^ set(adapters)
        if missing:
            raise UserError(
                f"{path}: lora.safetensors does not match the adapters, e.g. {sorted(missing)[:3]}"
            )
        model.load_state_dict(adapters, strict=False)
    return built
