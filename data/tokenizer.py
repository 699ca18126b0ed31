"""The tiny model's tokenizer: a real HF fast tokenizer, built with the `tokenizers` library.

It is word-level (every word, punctuation mark and the newline is one token) so that the tiny
LLaVA needs no sub-word learning, but it is a `PreTrainedTokenizerFast` saved with
`save_pretrained`, so every code path that serves it also serves a real LLaVA tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data import IMAGE_PLACEHOLDER

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]
# Words, runs of punctuation, and the newline (the `plain` template's separator) are tokens.
_PIECE = r"\w+|[^\w\s]+|\n"


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct pieces the word-level tokenizer splits `texts` into, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for piece in re.findall(_PIECE, text.replace(IMAGE_PLACEHOLDER, " ")):
            seen.setdefault(piece, None)
    return list(seen)


def build_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary is the special tokens + the pieces of `corpus`."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words_of(corpus):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins pieces with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_PLACEHOLDER],
    )
    tok.padding_side = "right"
    return tok
