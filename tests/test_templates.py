"""Exact token / label layout of the conversation templates."""

import pytest

from data import IGNORE_INDEX
from data.templates import VICUNA_SYSTEM, ConversationError, get_template
from models.tiny import CHAT_TOKENS, LLAMA3_SHAPED_CHAT, tiny_chat_tokenizer

IMG = 4  # the tiny tokenizer's <image> id


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the dot?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Is there a blue square?"},
    {"from": "gpt", "value": "no"},
]


def test_vicuna_layout_and_labels(tokenizer):
    enc = get_template("vicuna_v1").encode(CONV, tokenizer, IMG, max_length=1000)
    q1 = (
        ids(tokenizer, VICUNA_SYSTEM + " USER: ")
        + [IMG]
        + ids(tokenizer, "\nWhat colour is the dot? ASSISTANT:")
    )
    a1 = ids(tokenizer, "red") + [tokenizer.eos_token_id]
    q2 = ids(tokenizer, "USER: Is there a blue square? ASSISTANT:")
    a2 = ids(tokenizer, "no") + [tokenizer.eos_token_id]
    assert enc.input_ids == [tokenizer.bos_token_id] + q1 + a1 + q2 + a2
    ignore = lambda n: [IGNORE_INDEX] * n  # noqa: E731
    assert enc.labels == ignore(1 + len(q1)) + a1 + ignore(len(q2)) + a2
    assert enc.num_supervised == 4 and not enc.truncated
    assert tokenizer.decode([i for i in enc.labels if i != IGNORE_INDEX]) == "red </s> no </s>"


def test_plain_layout_supervises_caption_and_newline(tokenizer):
    conv = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "red dot"}]
    enc = get_template("plain").encode(conv, tokenizer, IMG, max_length=1000)
    caption = ids(tokenizer, "red dot\n")
    assert caption[-1] == tokenizer.convert_tokens_to_ids("\n")
    assert enc.input_ids == [tokenizer.bos_token_id, IMG] + caption
    assert enc.labels == [IGNORE_INDEX, IGNORE_INDEX] + caption


def test_truncation_is_reported(tokenizer):
    enc = get_template("vicuna_v1").encode(CONV, tokenizer, IMG, max_length=10)
    assert enc.truncated and len(enc.input_ids) == 10 and enc.num_supervised == 0


def test_prompt_is_the_encoding_up_to_the_answer(tokenizer):
    tmpl = get_template("vicuna_v1")
    enc = tmpl.encode(CONV[:2], tokenizer, IMG, max_length=1000)
    prompt = tmpl.prompt(CONV[0]["value"], tokenizer, IMG)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[len(prompt)] != IGNORE_INDEX and enc.labels[len(prompt) - 1] == IGNORE_INDEX


@pytest.mark.parametrize(
    "conv",
    [[], [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], [{"from": "human", "value": "q"}]],
)
def test_bad_conversations_raise(tokenizer, conv):
    with pytest.raises(ConversationError):
        get_template("vicuna_v1").encode(conv, tokenizer, IMG, 100)


def test_unknown_template_lists_known():
    with pytest.raises(KeyError, match="plain, vicuna_v1"):
        get_template("llama3")


# A Llama-3-shaped chat template (header tokens, end of turn distinct from eos) on the tiny
# tokenizer with those tokens added.
HEADERS, LLAMA3_LIKE = list(CHAT_TOKENS), LLAMA3_SHAPED_CHAT


@pytest.fixture
def chat_tokenizer():
    return tiny_chat_tokenizer()


def header(tok, role):
    return ids(tok, f"<|start_header_id|>{role}<|end_header_id|>\n\n")


def test_chat_template_layout_and_labels(chat_tokenizer):
    tok = chat_tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    enc = get_template("chat", "Answer in one word.").encode(CONV, tok, IMG, max_length=1000)
    system = header(tok, "system") + ids(tok, "Answer in one word.") + [eot]
    q1 = (
        header(tok, "user") + [IMG] + ids(tok, "\nWhat colour is the dot?") + [eot] + header(tok, "assistant")
    )
    a1 = ids(tok, "red") + [eot]
    q2 = header(tok, "user") + ids(tok, "Is there a blue square?") + [eot] + header(tok, "assistant")
    a2 = ids(tok, "no") + [eot]
    assert enc.input_ids == [tok.bos_token_id] + system + q1 + a1 + q2 + a2
    ignore = lambda n: [IGNORE_INDEX] * n  # noqa: E731
    assert enc.labels == ignore(1 + len(system) + len(q1)) + a1 + ignore(len(q2)) + a2
    # generation stops at the template's end of turn as well as at eos
    assert get_template("chat").stop_ids(tok) == [tok.eos_token_id, eot]


def test_chat_prompt_is_the_encoding_up_to_the_answer(chat_tokenizer):
    tmpl = get_template("chat", "Answer in one word.")
    enc = tmpl.encode(CONV[:2], chat_tokenizer, IMG, max_length=1000)
    prompt = tmpl.prompt(CONV[0]["value"], chat_tokenizer, IMG)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[len(prompt)] != IGNORE_INDEX and enc.labels[len(prompt) - 1] == IGNORE_INDEX
    # without a system prompt there is no system turn
    bare = get_template("chat").prompt(CONV[0]["value"], chat_tokenizer, IMG)
    assert bare == [chat_tokenizer.bos_token_id] + prompt[len(prompt) - len(bare) + 1 :]


def test_chat_template_given_as_jinja_replaces_the_tokenizers(tokenizer, chat_tokenizer):
    """The tiny tokenizer has no chat template: a given Jinja serves it, and the result equals
    the tokenizer's own template when they are the same text."""
    from data.errors import UserError

    with pytest.raises(UserError, match="no chat template"):
        get_template("chat").check(tokenizer)
    given = get_template("chat", "Answer in one word.", jinja=LLAMA3_LIKE)
    given.check(tokenizer)
    own = get_template("chat", "Answer in one word.")
    assert given.encode(CONV, chat_tokenizer, IMG, 1000) == own.encode(CONV, chat_tokenizer, IMG, 1000)


def test_a_chat_template_file_named_by_the_user(tmp_path, chat_tokenizer):
    """`--chat-template FILE` (evaluate, import, lmms-eval): the file's Jinja prompts instead of
    the tokenizer's; e.g. a BOS before Llama-3's template gives the two BOS tokens of codebases
    that tokenize the rendered chat with special tokens on (FALCON-8B's evaluation)."""
    from data.errors import UserError
    from data.templates import chosen_template

    (tmp_path / "twice.jinja").write_text("{{ bos_token }}" + LLAMA3_LIKE)
    question = CONV[0]["value"]
    twice = chosen_template("chat", "Be brief.", str(tmp_path / "twice.jinja"))
    own = chosen_template("chat", "Be brief.")
    bos = chat_tokenizer.bos_token_id
    assert twice.prompt(question, chat_tokenizer, IMG) == [bos] + own.prompt(question, chat_tokenizer, IMG)
    assert own.prompt(question, chat_tokenizer, IMG)[:2] == [bos] + header(chat_tokenizer, "system")[:1]
    with pytest.raises(UserError, match="goes with the chat template"):
        chosen_template("vicuna_v1", None, str(tmp_path / "twice.jinja"))
    with pytest.raises(UserError, match="chat template: cannot read .*missing.jinja"):
        chosen_template("chat", None, str(tmp_path / "missing.jinja"))


def test_chat_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    from data.errors import UserError

    chat_tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(UserError, match="rewrites earlier turns"):
        get_template("chat").check(chat_tokenizer)


def test_templates_round_trip_through_their_records():
    from data.templates import template_from_dict

    chat = get_template("chat", "Be brief.", jinja=LLAMA3_LIKE)
    again = template_from_dict(chat.to_dict())
    assert (again.name, again.system, again.jinja) == ("chat", "Be brief.", LLAMA3_LIKE)
    assert template_from_dict(None).name == "vicuna_v1"  # exports written before templates were recorded
    with pytest.raises(ValueError, match="only chat"):
        get_template("vicuna_v1", system="Be brief.")
