"""Exact token / label layout of the conversation templates."""

import pytest

from data import IGNORE_INDEX
from data.templates import VICUNA_SYSTEM, ConversationError, get_template

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
