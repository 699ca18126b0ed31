"""What `vtc evaluate` measures of one model beyond its answers: visual tokens per LLM layer,
analytic prefill FLOPs, prefill latency at batch 1 and N, decode speed and peak memory."""

from __future__ import annotations

import statistics
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from data.dataset import collate
from data.errors import UserError
from models.build import DTYPES, Built
from models.flops import PrefillFlops, counted_run, llm_flops, module_flops
from train.accuracy import QuestionSet, _prompt_item, visual_layer_mean


@dataclass
class Settings:
    limit: int | None = 200  # synthetic test images (each asked all its questions)
    batch_size: int = 64  # accuracy pass
    max_new_tokens: int = 8  # a grounded answer: up to 5 cells, " . ", the answer, </s>
    latency_batch: int = 8  # "batch N" of the latency figures
    decode_tokens: int = 16
    repeats: int = 5
    timing: bool = True
    device: str | None = None  # where every row runs; None: cuda when there is one, else cpu
    dtype: str = "auto"  # a DTYPES name, or "auto" (see `dtype_for`): the precision every row runs in

    def placement(self) -> tuple[torch.device, torch.dtype]:
        return placement(self.device, self.dtype)

    def resolved(self) -> Settings:
        """These settings with "auto" precision named (what eval.json records)."""
        device, _ = self.placement()
        return replace(self, dtype=dtype_for(self.dtype, device))


def dtype_for(dtype: str, device: torch.device) -> str:
    """A DTYPES name for `dtype` on `device`. "auto" is LLaVA's own evaluation precision,
    float16, on a GPU, and float32 on a CPU, where half precision is slow and some kernels lack it."""
    if dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def placement(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The device (None: cuda when there is one, else cpu) and precision (a DTYPES name or
    "auto") models are evaluated on; a name this machine cannot run is refused before any
    weights load."""
    place = device_for(device)
    return place, DTYPES[dtype_for(dtype, place)]


def device_for(device: str | None) -> torch.device:
    """The torch device `device` names (None: cuda when there is one, else cpu), checked."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        place = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"device {device!r}: {err}") from None
    if place.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: this machine has no CUDA device")
    if place.type == "cuda" and place.index is not None and place.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if place.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: vtc evaluates on cpu or cuda")
    return place


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (CPU memory tracker: weights
    and other tensors made before entering are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(tensor, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def prompt_batch(built: Built, questions: QuestionSet, size: int, count: int) -> dict:
    """The first `count` questions as one padded batch (the latency workload), prompted in the
    model's template (`built.template`)."""
    from data.dataset import load_views

    tmpl = built.template
    model, items = built.model, []
    for q in questions.questions[:count]:
        views = load_views(questions.read_image(q.image), size, model.view_tiling)
        prompt = tmpl.prompt("<image>\n" + q.text, built.tokenizer, model.image_token_id)
        items.append(_prompt_item(q, prompt, views))
    batch = collate(items, built.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    for key in ("input_ids", "attention_mask", "pixel_values"):  # image_grids stay: read as lists
        batch[key] = batch[key].to(device)
    return batch


def text_tokens(model, batch: dict) -> int:
    """Text tokens of a 1-sample batch: its real tokens but the <image> placeholders, and the
    crop indicators its images bring (models/views.py)."""
    ids = batch["input_ids"][batch["attention_mask"].bool()]
    grids = batch.get("image_grids")
    indicators = sum(indicator_tokens(model, tuple(g)) for g in grids.tolist()) if grids is not None else 0
    return int((ids != model.image_token_id).sum()) + indicators


def tidy(value: float) -> float | int:
    """`value` as an int where it is one (a static method's token counts), else to 2 decimals."""
    return int(value) if value == int(value) else round(value, 2)


def generate(built: Built, batch: dict, new_tokens: int):
    with torch.no_grad():
        return built.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=new_tokens,
            eos_token_id=None,  # decode exactly `new_tokens`
            image_grids=batch.get("image_grids"),
        )


def cost(
    built: Built, questions: QuestionSet, size: int, settings: Settings, answers: dict[str, dict]
) -> dict:
    """FLOPs, per-layer tokens, latency, decode speed and peak memory of one method, from its
    `answers` to `questions` (`answer_questions`); latency and memory are timed on the first
    questions asked (a skipped one's image cannot be read)."""
    built.model.eval()
    asked = [q for q in questions.questions if "visual_tokens_layers" in answers.get(q.id, {})]
    if not asked:
        skipped = [a["skipped"] for a in answers.values() if "skipped" in a]
        why = f": {skipped[0]}" if skipped else ""
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise UserError(f"none of the {len(questions.questions)} questions could be asked{why}{more}")
    questions = replace(questions, questions=asked)
    row = prefill_cost(built, questions, size, answers)
    if not settings.timing:
        return row
    one = prompt_batch(built, questions, size, 1)
    batch = prompt_batch(built, questions, size, settings.latency_batch)
    for name, inputs in (("batch1", one), ("batchN", batch)):
        prefill = timed(lambda inputs=inputs: generate(built, inputs, 1), settings.repeats)
        full = timed(
            lambda inputs=inputs: generate(built, inputs, 1 + settings.decode_tokens), settings.repeats
        )
        row[f"prefill_ms_{name}"] = 1000 * prefill
        # decode = the tokens after the first, at the batch's width
        row[f"decode_tokens_per_s_{name}"] = (
            inputs["input_ids"].shape[0] * settings.decode_tokens / max(full - prefill, 1e-9)
        )
    row["batch_n"] = batch["input_ids"].shape[0]
    row.update(peak_memory(built, batch))
    return row


def prefill_cost(built: Built, questions: QuestionSet, size: int, answers: dict[str, dict]) -> dict:
    """The prefill's FLOPs and tokens per decoder layer, each a mean over `questions` (all
    answered): every question with its own words (its prompt in the model's template), its own
    image's views (its grid: the tower's and projector's FLOPs, counted once per grid on the
    tower as it runs, so an encoder component's own work and savings count; crop indicators)
    and its own visual tokens per layer as its prefill held them (a dynamic method, DyVTE,
    exits at each question's own layer)."""
    model, config = built.model, built.hf.config
    words: dict[str, int] = {}  # question text → text tokens of its prompt (question sets repeat texts)
    towers: dict = {}  # grid → (tower FLOPs, projector FLOPs) of one image with that grid
    asked = Counter()  # (grid, text tokens, visual tokens per layer) → questions
    for q in questions.questions:
        grid = grid_of(answers[q.id])
        if grid not in towers:  # one image of each grid through the tower
            batch = prompt_batch(built, replace(questions, questions=[q]), size, 1)
            vision, (features, _) = counted_run(
                model.vision_features, batch["pixel_values"], batch.get("image_grids")
            )
            towers[grid] = (vision, module_flops(model.projector, features))
        if q.text not in words:
            words[q.text] = prompt_words(built, q.text)
        text = words[q.text] + indicator_tokens(model, grid)
        asked[grid, text, tuple(answers[q.id]["visual_tokens_layers"])] += 1
    count = len(questions.questions)
    vision = projector = llm = 0.0
    layer_tokens = [0.0] * len(model.llm.body.layers)
    for (grid, text, visual_layers), n in asked.items():  # sums over the questions
        vision += n * towers[grid][0]
        projector += n * towers[grid][1]
        llm += n * llm_flops(config.text_config, [text + v for v in visual_layers])
        layer_tokens = [total + n * (text + v) for total, v in zip(layer_tokens, visual_layers, strict=True)]
    visual = sum(n * visual_layer_mean(visual_layers) for (_, _, visual_layers), n in asked.items())
    return {
        "layer_tokens": [tidy(total / count) for total in layer_tokens],
        "visual_tokens_layer_mean": tidy(visual / count),
        "flops": PrefillFlops(vision / count, projector / count, llm / count).as_dict(),
    }


def prompt_words(built: Built, question: str) -> int:
    """Text tokens of `question`'s prompt in the model's template, as `prompt_batch` writes it:
    every token but the <image> placeholders (crop indicators, which depend on the image's
    grid, not counted)."""
    ids = built.template.prompt("<image>\n" + question, built.tokenizer, built.model.image_token_id)
    return sum(token != built.model.image_token_id for token in ids)


def grid_of(answer: dict) -> tuple[int, int] | None:
    """The (rows, cols) of crops the answered question's image was cut into (None: one view)."""
    grid = answer.get("grid")
    return None if grid is None else tuple(grid)


def indicator_tokens(model, grid: tuple[int, int] | None) -> int:
    """Crop-indicator text tokens an image of `grid` adds (models/views.py); 0 for one view."""
    return 0 if grid is None else model.views.text_tokens(grid)


def peak_memory(built: Built, batch: dict) -> dict:
    if torch.cuda.is_available() and next(built.model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        generate(built, batch, 1)
        peak = torch.cuda.max_memory_allocated() - before
        return {
            "peak_memory_mb": peak / 2**20,
            "memory_measure": "cuda max_memory_allocated (prefill, batch N)",
        }
    with LiveTensorBytes() as tracker:
        generate(built, batch, 1)
    return {
        "peak_memory_mb": tracker.peak / 2**20,
        "memory_measure": "live tensors made by the prefill (CPU)",
    }
