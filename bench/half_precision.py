"""What casting a model to half precision does to its LLM's rotary positions.

`module.to(torch.bfloat16)` rounds every floating buffer with the weights, a Llama's rotary
`inv_freq` among them; `from_pretrained(dtype=...)` and DeepSpeed keep those buffers in float32,
and so does vtc's `models.build.to_precision`, which `vtc evaluate --dtype`, the lmms-eval plugin
and `bf16-true` training use. For the LLM of each shipped 7B/8B config (no weights needed: the
rotary embedding is built from the config alone) this prints how far `inv_freq` moves when
rounded, and the largest error of the cos/sin the layers receive over the first N positions
(LLaVA-1.5: 576 image tokens and a question ≈ 700; FALCON-8B: a thumbnail and 16 crops of 64
registers, 1,088, and its prompt), both ways, against the float32 ones.

    python bench/half_precision.py [--positions 700 1200 2900]
"""

from __future__ import annotations

import argparse

import torch

from models.build import to_precision
from train.recipe import REPO_ROOT

CONFIGS = ("llava-1.5-7b-hf", "siglip-l-384-llama-3.1-8b")


def worst_error(rotary, reference, positions: int, dtype: torch.dtype) -> float:
    """The largest |cos − cos₃₂| or |sin − sin₃₂| over positions 0..positions−1, `rotary` run on
    `dtype` activations, `reference` (float32) on float32 ones."""
    ids = torch.arange(positions)[None]
    x = torch.zeros(1, 1, 8, dtype=dtype)
    pairs = zip(rotary(x, ids), reference(x.float(), ids), strict=True)
    return max((got.float() - want).abs().max().item() for got, want in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[700, 1200, 2900])
    args = parser.parse_args()
    from transformers import LlavaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head = " | ".join(f"{n} positions: `.to` / kept" for n in args.positions)
    print(f"| config | dtype | inv_freq rounded by (largest relative) | {head} |")
    print("|---|---|---|" + "---|" * len(args.positions))
    for name in CONFIGS:
        config = LlavaConfig.from_pretrained(REPO_ROOT / "models" / "configs" / name).text_config
        reference = LlamaRotaryEmbedding(config)
        for dtype in (torch.float16, torch.bfloat16):
            cast = LlamaRotaryEmbedding(config).to(dtype)
            kept = to_precision(LlamaRotaryEmbedding(config), dtype)
            moved = ((cast.inv_freq.float() - reference.inv_freq).abs() / reference.inv_freq).max().item()
            cells = [
                f"{worst_error(cast, reference, n, dtype):.3f} / {worst_error(kept, reference, n, dtype):.4f}"
                for n in args.positions
            ]
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {moved:.2%} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
