"""Conversation templates with per-turn label masking: LLaVA-1.5's `plain` and `vicuna_v1`, and
`chat`, the tokenizer's own chat template (Llama-3, Qwen2 and other chat LLMs ship one).

Each turn is tokenized on its own and the ids concatenated, so the label mask is exact by
construction: there is no "render the whole string, split on separators, re-tokenize" step that
can drift by a token. Only assistant answers and their end-of-turn token are supervised; every
other position is IGNORE_INDEX. The single `<image>` placeholder becomes one `image_token_id`,
which the model later replaces by however many visual embeddings the compressor emits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data import IGNORE_INDEX, IMAGE_PLACEHOLDER
from data.errors import UserError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Encoded:
    """One tokenized conversation. `labels[i]` is the target for position i (unshifted)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class ConversationError(ValueError):
    """A conversation that does not fit the template (wrong roles, missing image, ...)."""


def text_to_ids(text: str, tokenizer, image_token_id: int) -> list[int]:
    """Tokenize `text` without special tokens; each `<image>` becomes one `image_token_id`."""
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            ids.append(image_token_id)
        if part.strip():
            ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
    return ids


def conversation_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """[(human, gpt), ...] from LLaVA `conversations`, checking roles alternate human → gpt."""
    if not isinstance(conversations, list):
        raise ConversationError(f"'conversations' must be a list, got {type(conversations).__name__}")
    if not conversations or len(conversations) % 2:
        raise ConversationError(f"expected human/gpt pairs, got {len(conversations)} messages")
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i} is a {type(message).__name__}, not an object")
    pairs = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ConversationError(f"turn {i // 2}: roles must be human then gpt")
        if not isinstance(human.get("value"), str) or not isinstance(gpt.get("value"), str):
            raise ConversationError(f"turn {i // 2}: 'value' must be a string")
        pairs.append((human["value"], gpt["value"]))
    return pairs


def placeholder_problem(pairs: list[tuple[str, str]], has_image: bool) -> tuple[str, str] | None:
    """(kind, message) when the `<image>` placeholders of `pairs` (conversation_turns) do not fit
    the sample: one in an answer, or not exactly one in the questions of a sample with an image,
    or any without one. None when they fit. The converter and the loader both apply this rule."""
    if any(IMAGE_PLACEHOLDER in answer for _, answer in pairs):
        return "placeholder in an answer", "an answer holds <image>"
    count = sum(question.count(IMAGE_PLACEHOLDER) for question, _ in pairs)
    if has_image and count != 1:
        return (
            "placeholder count",
            f"one image but {count} <image> placeholders in its questions (needs exactly 1)",
        )
    if not has_image and count:
        return "placeholder count", "an <image> placeholder but no image"
    return None


class Template:
    """Turns conversations into (input_ids, labels) and questions into generation prompts."""

    name: str
    system: str | None = None  # a system prompt (only `chat` takes one)

    def to_dict(self) -> dict:
        """What `template_from_dict` rebuilds this template from (recorded with exported models)."""
        return {"name": self.name, "system": self.system}

    def check(self, tokenizer) -> None:
        """Raise UserError if `tokenizer` cannot serve this template (before any sample is read)."""

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a generated answer (none for a tokenizer without eos)."""
        return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def segments(self, conversations: list[dict], tokenizer, image_token_id: int):
        """Yields (ids, supervised) pieces in order; subclasses define the layout."""
        raise NotImplementedError

    def prompt_segments(self, question: str, tokenizer, image_token_id: int) -> list[int]:
        raise NotImplementedError

    def encode(self, conversations, tokenizer, image_token_id: int, max_length: int) -> Encoded:
        """Tokenize turn by turn; truncate to `max_length` ids (the caller accounts for the
        visual tokens the single image id will expand into)."""
        ids: list[int] = []
        labels: list[int] = []
        for piece, supervised in self.segments(conversations, tokenizer, image_token_id):
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
        truncated = len(ids) > max_length
        return Encoded(ids[:max_length], labels[:max_length], truncated)

    def prompt(self, question: str, tokenizer, image_token_id: int) -> list[int]:
        """Ids of a single-turn prompt ending where the assistant's answer begins."""
        return self.prompt_segments(question, tokenizer, image_token_id)


class PlainTemplate(Template):
    """Stage-1 alignment: `<s><image>{caption}\\n`, only the caption and newline supervised.
    The human text is dropped (LLaVA keeps only the image from it)."""

    name = "plain"

    def segments(self, conversations, tokenizer, image_token_id):
        pairs = conversation_turns(conversations)
        if len(pairs) != 1 or IMAGE_PLACEHOLDER not in pairs[0][0]:
            raise ConversationError("plain template needs one turn whose question holds <image>")
        yield [tokenizer.bos_token_id, image_token_id], False
        yield text_to_ids(pairs[0][1] + "\n", tokenizer, image_token_id), True

    def prompt_segments(self, question, tokenizer, image_token_id):
        return [tokenizer.bos_token_id, image_token_id]


class VicunaTemplate(Template):
    """LLaVA-1.5 instruction format:
    `<s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...`
    Supervised: each answer and its `</s>`."""

    name = "vicuna_v1"

    def _question(self, turn: int, question: str, tokenizer, image_token_id) -> list[int]:
        text = (VICUNA_SYSTEM + " " if turn == 0 else "") + "USER: " + question + " ASSISTANT:"
        return text_to_ids(text, tokenizer, image_token_id)

    def segments(self, conversations, tokenizer, image_token_id):
        yield [tokenizer.bos_token_id], False
        for turn, (question, answer) in enumerate(conversation_turns(conversations)):
            yield self._question(turn, question, tokenizer, image_token_id), False
            yield text_to_ids(answer, tokenizer, image_token_id) + [tokenizer.eos_token_id], True

    def prompt_segments(self, question, tokenizer, image_token_id):
        return [tokenizer.bos_token_id] + self._question(0, question, tokenizer, image_token_id)


# a two-turn conversation rendered to probe a chat template (and where it closes an answer)
PROBE = [("Is this a question?", "Yes."), ("And this?", "No.")]


class ChatTemplate(Template):
    """The tokenizer's chat template (`tokenizer.apply_chat_template`), with an optional system
    prompt first. LLaVA's `human`/`gpt` turns become `user`/`assistant` messages; `<image>` stays
    in the user's text, where `text_to_ids` finds it.

    Masking stays turn by turn: the conversation is rendered up to each question (with the
    template's generation prompt) and up to each answer, and each piece is what a rendering adds
    to the one before. The supervised piece is thus the answer plus whatever the template closes
    an assistant turn with (e.g. Llama-3's `<|eot_id|>`), which is also where generation stops.
    A template whose rendering of a longer conversation does not extend the shorter one's (one
    that rewrites earlier turns) cannot be masked this way and is refused."""

    name = "chat"

    def __init__(self, system: str | None = None, jinja: str | None = None):
        self.system = system
        self.jinja = jinja  # a Jinja template replacing the tokenizer's (None: the tokenizer's)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "jinja": self.jinja}

    def _start(self) -> list[dict]:
        return [] if self.system is None else [{"role": "system", "content": self.system}]

    def _render(self, tokenizer, messages: list[dict], ask: bool) -> str:
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(
                messages, chat_template=self.jinja, tokenize=False, add_generation_prompt=ask
            )
        except TemplateError as err:  # the template refused these messages (`raise_exception`)
            raise ConversationError(f"the chat template refused the conversation: {err}") from None

    @staticmethod
    def _added(before: str, after: str) -> str:
        if not after.startswith(before):
            raise ConversationError(
                "the tokenizer's chat template rewrites earlier turns when one is added, so its "
                "labels cannot be masked turn by turn"
            )
        return after[len(before) :]

    def texts(self, pairs: list[tuple[str, str]], tokenizer):
        """Yields (text, supervised) pieces whose concatenation is the whole rendering."""
        messages, rendered = self._start(), ""
        for question, answer in pairs:
            messages.append({"role": "user", "content": question})
            asked = self._render(tokenizer, messages, ask=True)
            yield self._added(rendered, asked), False
            messages.append({"role": "assistant", "content": answer})
            rendered = self._render(tokenizer, messages, ask=False)
            yield self._added(asked, rendered), True

    def check(self, tokenizer) -> None:
        if self.jinja is None and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "template chat: the model's tokenizer has no chat template (tokenizer_config.json "
                "`chat_template` or chat_template.jinja); give one (in a recipe, model.chat_template) or "
                "use vicuna_v1"
            )
        try:  # e.g. a template that refuses a system message, or rewrites earlier turns
            list(self.texts(PROBE, tokenizer))
        except ConversationError as err:
            raise UserError(f"template chat: {err}") from None

    def stop_ids(self, tokenizer) -> list[int]:
        """eos and the first token the template closes an answer with."""
        (question, answer), *_ = PROBE
        _, (answered, _) = self.texts([(question, answer)], tokenizer)
        closing = answered[answered.rfind(answer) + len(answer) :]
        first = tokenizer(closing, add_special_tokens=False).input_ids[:1] if closing.strip() else []
        return list(dict.fromkeys([*super().stop_ids(tokenizer), *first]))

    def segments(self, conversations, tokenizer, image_token_id):
        for text, supervised in self.texts(conversation_turns(conversations), tokenizer):
            yield text_to_ids(text, tokenizer, image_token_id), supervised

    def prompt_segments(self, question, tokenizer, image_token_id):
        messages = [*self._start(), {"role": "user", "content": question}]
        return text_to_ids(self._render(tokenizer, messages, ask=True), tokenizer, image_token_id)


TEMPLATES: dict[str, Template] = {t.name: t for t in (PlainTemplate(), VicunaTemplate())}
TEMPLATE_NAMES = (*TEMPLATES, ChatTemplate.name)


def get_template(name: str, system: str | None = None, jinja: str | None = None) -> Template:
    """The template `name`; `system` and `jinja` (a replacement chat template) are `chat`'s."""
    if name == ChatTemplate.name:
        return ChatTemplate(system, jinja)
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATE_NAMES))}")
    if system is not None or jinja is not None:
        raise ValueError(f"template {name!r} takes no system prompt or Jinja (only chat does)")
    return TEMPLATES[name]


def template_from_dict(spec: dict | None) -> Template:
    """The template `Template.to_dict` recorded; vicuna_v1 where nothing was (older exports)."""
    spec = spec or {"name": VicunaTemplate.name}
    return get_template(spec["name"], spec.get("system"), spec.get("jinja"))


def chosen_template(
    name: str | None, system: str | None = None, jinja_file: str | None = None
) -> Template | None:
    """The template a user named (`vtc evaluate/import --template`, lmms-eval's `template`), with
    its system prompt and a Jinja file replacing the tokenizer's chat template; None when none
    was named. A system prompt or Jinja file without `chat` is refused, as is a file that cannot
    be read."""
    if system is not None and name != ChatTemplate.name:
        raise UserError("a system prompt goes with the chat template (--template chat)")
    if jinja_file is not None and name != ChatTemplate.name:
        raise UserError("a chat template file goes with the chat template (--template chat)")
    jinja = None if jinja_file is None else read_jinja(jinja_file, "chat template")
    return None if name is None else get_template(name, system, jinja)


def read_jinja(path: str, label: str) -> str:
    """The text of a Jinja chat-template file; a UserError naming `label` (the key or option
    that gave it) when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as err:
        raise UserError(f"{label}: cannot read {path!r}: {err}") from None
