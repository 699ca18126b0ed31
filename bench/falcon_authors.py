"""vtc's FALCON against the authors' released code on the same weights (CPU, tiny random model).

For each tower, SigLIP (FALCON-8B's) and CLIP (their other branch, LLaVA-1.5's tower), the
authors' code (github.com/JiuTian-VL/FALCON) builds a tiny FALCON-Llama (a tower of 2 layers, 4
registers, `grid_4`, ReAtten on, an MLP projector), every weight perturbed (registers and crop
embeddings drawn from N(0, 1), each layer's ReAtten moved away from its self-attention copy),
saves it with its own `save_pretrained` and answers two inputs: one image as a thumbnail + 2 × 2
crops, and two images (2 × 2 and 1 × 3) with text between them. vtc then imports that checkpoint
(`vtc import`), runs the same pixels and tokens, and this prints the largest difference at each
step: the tower's input (patches + registers + crop embedding), each layer's register rows, the
registers leaving the tower, the visual tokens entering the LLM, and the logits (on SigLIP also
with FALCON's text crop indicators before each view, as their processor writes them); then two
controls that must differ (ReAtten's output zeroed; the thumbnail's crop embedding swapped with
crop (0, 0)'s). Their processor's grid choice (`anchor_rank` over
`grid_4` and `grid_9`) is compared with vtc's `shape_match` on 3,528 image sizes. Exit status 1
if the logits differ by more than 1e-4 or any grid does.

With torchvision in their environment, their processor's thumbnail and crops of 40 images
(24-400 px a side, `grid_9`, 64 px crops) are compared with vtc's `load_views`, pixel by pixel.

Their code needs transformers 4.45 and vtc needs 5, so their side runs in its own environment:

    git clone https://github.com/JiuTian-VL/FALCON /tmp/falcon-code     # any copy of their code
    python -m venv /tmp/falcon-env
    /tmp/falcon-env/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.45.2 \
        safetensors einops icecream shortuuid pillow
    python bench/falcon_authors.py --authors-code /tmp/falcon-code --authors-python /tmp/falcon-env/bin/python

Their code is imported, never copied. torchvision does not install beside the CPU build of torch
(`torch==2.13.0` alone makes a 1.2 GB environment; with torchvision it is a 5.6 GB CUDA build):
without it, a stand-in gives their processor module the names it imports and `box_area`, the
only part of torchvision their grid choice uses, and the pixels are not compared. Not covered:
half precision and generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REGISTERS, ANCHOR_MAX = 4, 4
# their code asserts 576 + M tokens per view (577 + M with CLIP's CLS; vision_encoder.py), so
# the tiny towers keep 24 × 24 patches: 48 px images in 2 px patches
IMAGE, PATCH = 48, 2
TOWERS = ("siglip", "clip")  # their branch is chosen by the tower's name
TEXT = [102, 5, 11, 101, 113, 102, 114]  # words of vtc's tiny vocabulary
ONE = {"views": 5, "grids": [[2, 2]], "positions": [[4, 4], [0, 0], [0, 1], [1, 0], [1, 1]], "seed": 2}
TWO = {
    "views": 9,
    "grids": [[2, 2], [1, 3]],
    "positions": [[4, 4], [0, 0], [0, 1], [1, 0], [1, 1], [4, 4], [0, 0], [0, 1], [0, 2]],
    "seed": 3,
    "texts": [[10, 11, 12], [13, 14, 15, 16]],
}
TOLERANCE = 1e-4
# image sizes (width, height) on which both pick a grid among grid_4 and grid_9, 384 px crops
SIZES = [(w, h) for w in range(40, 3000, 53) for h in range(40, 3000, 47)]
GRID_SETS, CROP = (4, 9), 384
PICTURES, PICTURE_CROP = 40, 64  # images of 24-400 px a side through both processors (grid_9)


def authors_side(work: Path) -> None:
    """In the authors' environment: build, perturb, save and run their FALCON on each tower."""
    import torch

    tokens = json.loads((work / "tokens.json").read_text())  # vtc's tokenizer, described
    results = {tower: their_answers(work, tower, tokens) for tower in TOWERS}
    results["grids"] = their_grids()
    results["pixels"] = their_pixels(work)
    torch.save(results, work / "theirs.pt")


def their_answers(work: Path, tower: str, tokens: dict) -> dict:
    """Their FALCON-Llama on `tower`, saved to work/ckpt-<tower> (with vtc's tokenizer files),
    and what it computes on each case (fp32, eval): logits, the tower's hidden states, the
    registers leaving the tower and the visual tokens entering the LLM."""
    import shutil

    import torch
    from jiutian.constants import IMAGE_TOKEN_INDEX
    from jiutian.model.modeling_jiutian import JiutianConfig, JiutianLlamaForCausalLM
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    torch.manual_seed(0)
    tower_dir = work / f"tiny-{tower}-tower"
    vision_config = SiglipVisionConfig if tower == "siglip" else CLIPVisionConfig
    vision_config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    ).save_pretrained(tower_dir)
    config = JiutianConfig(
        vocab_size=tokens["vocab"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokens["bos"],
        eos_token_id=tokens["eos"],
        pad_token_id=tokens["pad"],
        tie_word_embeddings=False,
        mm_load=True,
        vision_delay_load=False,
        visual_config={
            "model_name_or_path": str(tower_dir),
            "feature_type": "query",
            "num_vision_queries": REGISTERS,
            "anchor_max": ANCHOR_MAX,
            "enable_interactive_attn": True,
        },
        projector_config={
            "projector_type": "mlp2x_gelu",
            "input_dim": 32,
            "hidden_size": 64,
            "output_dim": 64,
        },
        processor_config={
            "image_size": IMAGE,
            "anchors": f"grid_{ANCHOR_MAX}",
            "add_global_img": True,
            "add_textual_crop_indicator": False,
        },
    )
    config.architectures = ["JiutianLlamaForCausalLM"]
    model = JiutianLlamaForCausalLM(config).float().eval()
    noise = torch.Generator().manual_seed(1)
    vision = model.model.vision_model
    with torch.no_grad():  # every weight moved; FALCON's own parts far from their start
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
        for p in (vision.vision_queries, vision.crop_embedding_h.weight, vision.crop_embedding_w.weight):
            p.copy_(torch.randn(p.shape, generator=noise))
        for layer in vision.vision_tower.vision_model.encoder.layers:
            for p in layer.interact_attn.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=noise))
    checkpoint = work / f"ckpt-{tower}"
    model.save_pretrained(checkpoint, safe_serialization=True)
    for file in (work / "tokenizer").iterdir():
        shutil.copy(file, checkpoint / file.name)

    captured = {}
    hooks = [
        vision.vision_tower.register_forward_hook(
            lambda _m, _a, out: captured.update(hidden=[h.clone() for h in out.hidden_states])
        ),
        vision.register_forward_hook(lambda _m, _a, out: captured.update(selected=out.clone())),
        model.model.vision2text.register_forward_hook(
            lambda _m, _a, out: captured.update(visual=out.clone())
        ),
    ]
    # with text crop indicators their processor writes `<global_img><image><crop_img_row0_col0>
    # <image>...` and their tokenizer_image_token tokenizes the text between the images
    indicated = [tokens["bos"]]
    for row, col in ONE["positions"]:
        indicated += tokens["indicators"][f"{row},{col}"] + [IMAGE_TOKEN_INDEX]
    first, second = TWO["texts"]
    cases = {
        "one": (ONE, [tokens["bos"]] + [IMAGE_TOKEN_INDEX] * 5 + TEXT),
        "two": (TWO, [tokens["bos"]] + [IMAGE_TOKEN_INDEX] * 5 + first + [IMAGE_TOKEN_INDEX] * 4 + second),
        "indicated": (ONE, indicated + TEXT),
    }
    results = {}
    for name, (case, ids) in cases.items():
        pixels = torch.randn(
            case["views"], 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(case["seed"])
        )
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                images=pixels,
                patch_positions=torch.tensor(case["positions"]),
                num_images=[5, 4] if name == "two" else [5],
                use_cache=False,
            ).logits[0]
        results[name] = {"pixels": pixels, "logits": logits, **captured}
    for hook in hooks:
        hook.remove()
    return results


def their_pixels(work: Path) -> list | None:
    """Their processor's views of PICTURES images (written to work/pictures as PNG), as
    (pixels (1 + rows·cols, 3, S, S), patch positions); None without a real torchvision."""
    stub_torchvision()
    import torchvision

    if getattr(torchvision, "stand_in", False):
        return None
    import numpy as np
    from jiutian.processor import AdaptiveCropProcessor
    from PIL import Image

    processor = AdaptiveCropProcessor(image_size=PICTURE_CROP, anchors="grid_9", add_global_img=True)
    folder = work / "pictures"
    folder.mkdir(exist_ok=True)
    rng, out = np.random.default_rng(0), []
    for index in range(PICTURES):
        width, height = (int(v) for v in rng.integers(24, 400, size=2))
        ramp = (
            np.linspace(0, 255, width)[None, :, None] * rng.random(3)
            + np.linspace(0, 255, height)[:, None, None]
        )
        noisy = (ramp / 2 + rng.normal(0, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{index}.png")
        with Image.open(folder / f"{index}.png") as image:
            pixels, positions, _ = processor._process_image([image.convert("RGB")])
        out.append((pixels, positions))
    return out


def their_grids() -> dict:
    """Their processor's grid for every size of SIZES (its `anchor_rank` over `grid_N`)."""
    import torch

    stub_torchvision()
    from jiutian.processor import anchor_rank, box_area, grid_dict

    chosen = {}
    for most in GRID_SETS:
        grids = grid_dict[f"grid_{most}"]
        anchors = torch.tensor([[0, 0, cols * CROP, rows * CROP] for rows, cols in grids])  # as AnchorResize
        areas = box_area(anchors)
        chosen[most] = [tuple(grids[int(anchor_rank(anchors, areas, (h, w)))]) for w, h in SIZES]
    return chosen


def stub_torchvision() -> None:
    """Their processor module imports torchvision, which does not install beside a CPU torch
    here; of it, their grid choice uses only `box_area` ((x2 - x1) · (y2 - y1)), so where it is
    missing a stand-in module gives that and the names the module reads when imported."""
    import importlib.util
    import types

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    vision, transforms, functional, ops, boxes = (
        types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    )
    vision.stand_in = True
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", BICUBIC="bicubic")
    transforms.functional, vision.transforms, vision.ops, ops.boxes = functional, transforms, ops, boxes
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    sys.modules.update({m.__name__: m for m in (vision, transforms, functional, ops, boxes)})


def vtc_side(work: Path) -> int:
    """In vtc's environment: import their checkpoints, run the same inputs, print the differences."""
    import torch

    theirs = torch.load(work / "theirs.pt")
    rows, controls, worst = [], [], 0.0
    for tower in TOWERS:
        worst = max(worst, compare_tower(work, tower, theirs[tower], rows, controls))
    grid_lines, grids_differ = compare_grids(theirs["grids"])
    pixel_line, pixels_differ = compare_pixels(work, theirs["pixels"])
    print("| compared | largest difference | largest value (theirs) |")
    print("|---|---|---|")
    for what, diff, size in rows:
        print(f"| {what} | {diff:.1e} | {size:.2f} |")
    for what, diff in controls:
        print(f"| {what} | {diff:.2f} | |")
    print("\n".join(grid_lines))
    print(pixel_line)
    controls_seen = all(diff > 100 * TOLERANCE for _, diff in controls)
    ok = worst <= TOLERANCE and controls_seen and not grids_differ and not pixels_differ
    print(
        f"{'same' if ok else 'DIFFERENT'}: logits within {worst:.1e} (tolerance {TOLERANCE:g}), "
        f"{grids_differ} grid choices differ"
    )
    return 0 if ok else 1


def compare_tower(work: Path, tower: str, theirs: dict, rows: list, controls: list) -> float:
    """Import their checkpoint on `tower`, run each case, add (what, difference, size) to `rows`
    (and on SigLIP the controls to `controls`); returns the largest logits difference."""
    import torch

    from models.export import load_pretrained
    from models.importer import import_llava

    name = {"siglip": "SigLIP", "clip": "CLIP"}[tower]
    tower_dir = work / f"tiny-{tower}-tower"
    out, notes = import_llava(work / f"ckpt-{tower}", work / f"export-{tower}", vision_tower=tower_dir)
    if notes:
        print(f"{name}: import notes: {notes}")
    model = load_pretrained(out).model.eval()
    one, two = theirs["one"], theirs["two"]
    vocab = one["logits"].shape[-1]
    bos, image = model_bos(out), model.image_token_id
    first, second = TWO["texts"]
    ids_one, ids_two = [bos, image, *TEXT], [bos, image, *first, image, *second]

    def compare(what: str, mine, reference) -> float:
        diff = (mine - reference).abs().max().item()
        rows.append((f"{name}: {what}", diff, reference.abs().max().item()))
        return diff

    grids = torch.tensor(ONE["grids"])
    with torch.no_grad():
        features, _ = model.vision_features(one["pixels"], grids)
        visual = model.encode_images(one["pixels"], grids)[0]
        visual_two = torch.cat(list(model.encode_images(two["pixels"], torch.tensor(TWO["grids"]))))
    compare("tower input: patches + registers + crop embedding", features.hidden_states[0], one["hidden"][0])
    for layer in range(1, len(one["hidden"])):
        mine, reference = features.hidden_states[layer][:, -REGISTERS:], one["hidden"][layer][:, -REGISTERS:]
        compare(f"layer {layer - 1} output, register rows", mine, reference)
    compare("registers leaving the tower", features.selected, one["selected"])
    compare("visual tokens into the LLM", visual, one["visual"].flatten(0, 1))
    mine = logits_of(model, one["pixels"], ids_one, ONE["grids"], vocab)
    worst = compare("logits, one image (thumbnail + 2 × 2)", mine, one["logits"])
    compare("visual tokens, two images (2 × 2 and 1 × 3)", visual_two, two["visual"].flatten(0, 1))
    mine = logits_of(model, two["pixels"], ids_two, TWO["grids"], vocab)
    worst = max(worst, compare("logits, two images with text between", mine, two["logits"]))
    if tower != "siglip":
        return worst

    named, _ = import_llava(
        with_indicators(work / "ckpt-siglip"), work / "export-siglip-indicated", vision_tower=tower_dir
    )
    mine = logits_of(load_pretrained(named).model.eval(), one["pixels"], ids_one, ONE["grids"], vocab)
    worst = max(
        worst, compare("logits, one image with text crop indicators", mine, theirs["indicated"]["logits"])
    )
    for what, spoil in (
        ("ReAtten's output zeroed", zero_reatten),
        ("thumbnail's crop embedding swapped", swap_thumbnail),
    ):
        spoilt = load_pretrained(out).model.eval()
        spoil(spoilt.compressors[0])
        changed = logits_of(spoilt, one["pixels"], ids_one, ONE["grids"], vocab)
        controls.append(
            (f"{name}: control, must differ: {what}", (changed - one["logits"]).abs().max().item())
        )
    return worst


def logits_of(model, pixels, ids: list[int], grids: list, vocab: int):
    """vtc's logits (T, vocab) for one sequence with its images' views."""
    import torch

    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(
            ids,
            torch.ones_like(ids, dtype=torch.bool),
            pixels,
            return_logits=True,
            image_grids=torch.tensor(grids),
        )
    return out.logits[0, :, :vocab]


def with_indicators(checkpoint: Path) -> Path:
    """A copy of `checkpoint` (its files linked) whose config switches on their text crop
    indicators, a processor setting."""
    indicated = checkpoint.with_name(checkpoint.name + "-indicated")
    indicated.mkdir(exist_ok=True)
    for file in checkpoint.iterdir():
        if file.name != "config.json" and not (indicated / file.name).exists():
            (indicated / file.name).symlink_to(file.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config["processor_config"]["add_textual_crop_indicator"] = True
    (indicated / "config.json").write_text(json.dumps(config))
    return indicated


def zero_reatten(falcon) -> None:
    import torch

    with torch.no_grad():
        for reatten in falcon.reatten:
            reatten.out_proj.weight.zero_()
            reatten.out_proj.bias.zero_()


def swap_thumbnail(falcon) -> None:
    """The thumbnail's crop embedding (index anchor_max) swapped with crop row/column 0's."""
    import torch

    with torch.no_grad():
        for embedding in (falcon.crop_row, falcon.crop_col):
            embedding.weight[[0, ANCHOR_MAX]] = embedding.weight[[ANCHOR_MAX, 0]].clone()


def compare_grids(chosen_by_them: dict) -> tuple[list[str], int]:
    """Lines saying where vtc's `shape_match` picks their processor's grid, and how many differ."""
    from data.subimages import select_grid_by_shape

    lines, differ_total = [], 0
    for most, chosen in chosen_by_them.items():
        grids = [tuple(g) for g in chosen_candidates(most)]
        ours = [select_grid_by_shape(w, h, grids, CROP) for w, h in SIZES]
        differ = [(size, a, b) for size, a, b in zip(SIZES, ours, chosen, strict=True) if a != tuple(b)]
        lines.append(f"grid_{most}: the same grid for {len(SIZES) - len(differ)} of {len(SIZES)} image sizes")
        lines += [f"  {w}×{h}: vtc {a}, theirs {tuple(b)}" for (w, h), a, b in differ[:5]]
        differ_total += len(differ)
    return lines, differ_total


def compare_pixels(work: Path, theirs: list | None) -> tuple[str, int]:
    """A line comparing their processor's views with vtc's `load_views`, and a count of
    differences (grids apart, plus 1 if any pixel is off by more than the tolerance)."""
    if theirs is None:
        return "their processor's pixels: not compared (their environment has no torchvision)", 0
    from data.dataset import load_views
    from data.subimages import Tiling

    tiling = Tiling(tuple(chosen_candidates(9)), "shape_match")
    largest, grids_apart, kinds = 0.0, 0, set()
    for index, (pixels, positions) in enumerate(theirs):
        picture = (work / "pictures" / f"{index}.png").read_bytes()
        views, grid = load_views(picture, PICTURE_CROP, tiling)
        their_grid = tuple(int(v) + 1 for v in positions[1:].max(0).values)
        kinds.add(their_grid)
        if grid != their_grid:
            grids_apart += 1
            continue
        largest = max(largest, (views - pixels).abs().max().item())
    line = (
        f"their processor's pixels ({len(theirs)} images of 24-400 px, grid_9, {PICTURE_CROP} px crops, "
        f"{len(kinds)} different grids): {grids_apart} grids differ, thumbnail and crops within {largest:.1e}"
    )
    return line, grids_apart + (largest > TOLERANCE)


def chosen_candidates(most: int) -> list[tuple[int, int]]:
    """FALCON's `grid_N` candidates in their order, as `vtc import` reads them (its views)."""
    from models.importer import falcon_layout

    config = {
        "visual_config": {"feature_type": "query", "anchor_max": most},
        "processor_config": {"anchors": f"grid_{most}"},
    }
    import torch

    registers = {"model.vision_model.vision_queries": torch.zeros(1, 1, 1)}
    return list(falcon_layout(config, registers)[4].grids)


def model_bos(export: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export).bos_token_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-code", help="a copy of github.com/JiuTian-VL/FALCON")
    parser.add_argument("--authors-python", help="the python of an environment with transformers 4.45")
    parser.add_argument("--work", help="folder for the checkpoint and outputs (default: a temporary one)")
    parser.add_argument("--side", choices=["authors"], help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.side == "authors":
        authors_side(Path(args.work))
        return 0
    if not (args.authors_code and args.authors_python):
        parser.error("give --authors-code and --authors-python (see the module docstring)")
    from models.tiny import tiny_tokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="falcon-authors-"))
    from models.views import CropIndicators

    # the checkpoint's tokenizer (their transformers cannot read its files, so its ids go to their
    # side as JSON), knowing FALCON's indicators as Llama-3.1's BPE does
    tokenizer, names = tiny_tokenizer(), CropIndicators()
    places = [(-1, -1)] + [(r, c) for r in range(ANCHOR_MAX) for c in range(ANCHOR_MAX)]
    tokenizer.add_tokens([names.text(r, c) for r, c in places])
    tokenizer.save_pretrained(work / "tokenizer")
    indicators = {  # their patch position of the thumbnail is (anchor_max, anchor_max)
        f"{ANCHOR_MAX if r < 0 else r},{ANCHOR_MAX if c < 0 else c}": tokenizer(
            names.text(r, c), add_special_tokens=False
        ).input_ids
        for r, c in places
    }
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    (work / "tokens.json").write_text(json.dumps({"vocab": len(tokenizer), "indicators": indicators, **ids}))
    env = {**os.environ, "PYTHONPATH": str(Path(args.authors_code).resolve())}
    command = [args.authors_python, __file__, "--side", "authors", "--work", str(work)]
    if subprocess.run(command, env=env).returncode:
        print("the authors' side failed (see above)")
        return 1
    return vtc_side(work)


if __name__ == "__main__":
    sys.exit(main())
