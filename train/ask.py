"""`vtc ask`: a model answers questions about one image, each asked as `vtc evaluate` asks its
questions (a single-turn `<image>\\n{question}` prompt in the model's template, greedy decoding,
the image through the model's own views), so what a user sees here is what the evaluation
scored. Questions are independent: no conversation history is kept between them."""

from __future__ import annotations

from pathlib import Path

from data.errors import UserError
from models.build import Built
from train.accuracy import Question, QuestionSet, answer_questions, visual_layer_mean


def answers(
    built: Built,
    image: bytes,
    questions: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    label: str = "image",
    progress: bool = False,
) -> list[dict]:
    """The model's answer to each of `questions` about `image` (the file's bytes: PNG, JPEG, ...),
    in order: {"question", "answer", "visual_tokens" (that entered the LLM),
    "visual_tokens_layer_mean" (in its decoder layers' sequences, on average),
    "visual_tokens_layers" (in each layer's: where a DyVTE exit or a pruner cut them)}.
    An image that does not decode is a UserError naming `label`, before any question is asked.
    `progress`: a bar over the batches on stderr."""
    check_questions(questions)
    asked = [Question(str(index), label, "asked", text.strip()) for index, text in enumerate(questions)]
    replies = answer_questions(
        built.model,
        built.tokenizer,
        QuestionSet(asked, lambda _key: image, name=label),
        built.hf.config.vision_config.image_size,
        built.template,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc="ask",
    )
    out = []
    for q in asked:
        reply = replies[q.id]
        if "skipped" in reply:  # the same reason for every question: the image
            raise UserError(f"{reply['skipped']}: not an image vtc can read")
        out.append(
            {
                "question": q.text,
                "answer": reply["text"],
                "visual_tokens": reply["visual_tokens"],
                "visual_tokens_layer_mean": round(visual_layer_mean(reply["visual_tokens_layers"]), 2),
                "visual_tokens_layers": reply["visual_tokens_layers"],
            }
        )
    return out


def check_questions(questions: list[str]) -> None:
    """Refuse an empty question (a model would answer the image alone)."""
    empty = next((index for index, text in enumerate(questions) if not text.strip()), None)
    if empty is not None:
        raise UserError(f"question {empty + 1} is empty")


def read_image(path: str) -> bytes:
    """The bytes of the image file at `path`, checked to decode as the data converter checks
    an image (`data.convert.read_image`: truncated files and decompression bombs refused, exotic
    formats re-encoded as PNG), before a model loads for it."""
    from data.convert import BadEntry
    from data.convert import read_image as decodable_image

    try:
        return decodable_image(Path(path))[0]
    except BadEntry as err:
        raise UserError(str(err)) from None
