"""lmms-eval plugin: any vtc model on lmms-eval's benchmarks, answered by `vtc evaluate`'s code.

    pip install -e ".[lmms]"
    lmms-eval --model vtc --model_args pretrained=DIR[,compressor=NAME,tokens=N] --tasks gqa,pope

`pretrained` is what `vtc evaluate` accepts (a run, a vtc export, a llava-hf folder, a shipped
base by name); `compressor` a training-free baseline (`pooling`, `fastv`, ... or a component
name) added to that base at `tokens` visual tokens; `tokens` alone sets a trained pruner's
budget. Other model_args: `device` (default cuda when there is one), `dtype` (float32,
bfloat16, float16 or auto, the default: float16 on a GPU, as LLaVA evaluates, float32 on a
CPU), `template`, `system_prompt` and `chat_template` (a Jinja file), as `vtc evaluate
--template` (e.g. `template=chat` for a llava-hf folder of a chat LLaVA; lmms-eval splits
model_args at commas, so the system prompt can hold none); `setting` as `vtc evaluate --setting`
(one, e.g. `setting=falcon.reatten=false`); the batch is lmms-eval's `--batch_size` (its
default 1 is slow: pass 16).

Questions are answered by `train.accuracy.answer_questions`, the function `vtc evaluate` uses:
the same image preprocessing, the model's prompt template (`vicuna_v1`, or the `chat` template
recorded with a run or export) with the image first, and greedy decoding, so the
two give identical answers on the same questions (tests/test_lmms.py). lmms-eval's `until` stop
strings cut the greedy answer; sampling settings (`temperature`, `do_sample`) are ignored, with a
warning. One image per question (LLaVA-1.5's setting); loglikelihood (multiple-choice by
likelihood) and multi-round requests are refused with a clear error.

lmms-eval finds the model through the `lmms_eval.models` entry point in pyproject.toml
(`manifest` below); importing this module needs lmms-eval installed.
"""

from __future__ import annotations

import io
import os
import warnings

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from data.templates import chosen_template
from train.accuracy import Question, QuestionSet, answer_questions
from train.evaluation.sources import placed_model

DEFAULT_MAX_NEW_TOKENS = 32


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval's model `vtc` is `VtcLmms`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtc", simple_class_path="train.evaluation.lmms.VtcLmms")


def process_device(device: str | None) -> str | None:
    """The device this process answers on. Under a multi-process launch (`accelerate launch
    -m lmms_eval`, `torchrun`: WORLD_SIZE > 1, LOCAL_RANK set), where lmms-eval splits the
    questions between the processes, each takes its own GPU, cuda:LOCAL_RANK, for no device
    or plain "cuda" (else every process would load the model onto cuda:0); a named GPU or the
    CPU stays as given."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_RANK")
    if world > 1 and local is not None and device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(local)}"
    return device


def png_bytes(image) -> bytes:
    """A PIL image as lossless PNG bytes: what `answer_questions` reads and decodes again."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first of the `stops` strings (what stopping there would have produced)."""
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


class VtcLmms(lmms):
    """lmms-eval's `vtc` model: a vtc model built as `vtc evaluate` builds its rows."""

    def __init__(
        self,
        pretrained: str,
        compressor: str | None = None,
        tokens: int | str | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str = "auto",
        template: str | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        setting: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval's `--max_batch_size` (for "auto"); unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"vtc: unknown model_args {', '.join(sorted(unknown))}; known: pretrained, compressor, "
                "tokens, batch_size, device, dtype, template, system_prompt, chat_template, setting"
            )
        budget = int(tokens) if tokens not in (None, "") else None
        # as `vtc evaluate --template`: e.g. a llava-hf folder of a chat LLaVA
        prompt = chosen_template(template, system_prompt, chat_template)
        self.built, self._device = placed_model(
            pretrained,
            compressor,
            budget,
            process_device(device),
            dtype,
            prompt,
            [setting] if setting else [],
        )
        self.image_size = self.built.hf.config.vision_config.image_size
        # lmms-eval's `--batch_size` (default 1) overrides model_args; "auto" → vtc's default 16
        self.batch_size_per_gpu = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._rank, self._world_size = 0, 1
        self._warned_sampling = False

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _question(self, index: int, request: Instance) -> tuple[Question, bytes, dict]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(
                f"vtc answers with one image per question; {task} {split} document {doc_id} "
                f"has {len(visuals)}"
            )
        sampling = gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0
        if sampling and not self._warned_sampling:
            warnings.warn(
                "vtc decodes greedily, as vtc evaluate does; sampling settings are ignored", stacklevel=3
            )
            self._warned_sampling = True
        text = context.replace("<image>", "").strip()
        return Question(str(index), str(index), task, text), png_bytes(visuals[0]), gen_kwargs

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers in request order, grouped by `max_new_tokens` (one batched run each)."""
        asked = [self._question(i, r) for i, r in enumerate(requests)]
        images = {q.image: data for q, data, _ in asked}
        groups: dict[int, list[Question]] = {}
        for q, _, gen_kwargs in asked:
            groups.setdefault(int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), []).append(q)
        answers: dict[str, dict] = {}
        for new_tokens, questions in groups.items():
            answers |= answer_questions(
                self.built.model,
                self.built.tokenizer,
                QuestionSet(questions, images.__getitem__, name="lmms-eval"),
                self.image_size,
                self.built.template,
                batch_size=self.batch_size_per_gpu,
                max_new_tokens=new_tokens,
                desc="vtc",
            )
        out = []
        for q, _, gen_kwargs in asked:
            stops = gen_kwargs.get("until") or []
            text = answers[q.id].get("text", "")  # PNG bytes always decode: never skipped
            out.append(cut_at(text, [stops] if isinstance(stops, str) else list(stops)))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "vtc answers generation tasks (generate_until: GQA, POPE, MME, TextVQA, MMBench, ...); "
            "tasks scored by loglikelihood are not supported"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtc answers single-round questions (LLaVA-1.5's evaluation setting)")
