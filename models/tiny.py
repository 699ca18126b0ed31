"""The tiny LLaVA: the real HF classes (CLIPVisionModel, LlamaModel, LlavaForConditionalGeneration)
with tiny configs, and the tiny word-level tokenizer over the synthetic data's vocabulary."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

from data import IMAGE_PLACEHOLDER
from data.synth import vocabulary_corpus
from data.templates import VICUNA_SYSTEM
from data.tokenizer import build_word_tokenizer


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 64
    patch_size: int = 8  # 8×8 = 64 visual tokens
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    llm_width: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    max_positions: int = 512
    # "siglip": a SigLIP-style tower (no CLS token, a post-norm), as FALCON's authors use
    vision_type: Literal["clip", "siglip"] = "clip"


def tiny_tokenizer(extra_words: Iterable[str] = ()):
    """The synthetic data's words (+ `extra_words`, for experiments with other wordings)."""
    corpus = vocabulary_corpus() + [VICUNA_SYSTEM, "USER: ASSISTANT:", *extra_words]
    return build_word_tokenizer(corpus)


# A chat template shaped like Llama-3's (header tokens around each role, an end of turn other
# than eos, the BOS written by the template), for the tiny tokenizer with those tokens added:
# what checks of `template: chat` run on, where no real Llama-3 tokenizer can be downloaded.
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_SHAPED_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_chat_tokenizer(tokenizer=None):
    """`tokenizer` (default: a new tiny one) with CHAT_TOKENS added and LLAMA3_SHAPED_CHAT as its
    chat template."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    tokenizer.add_tokens(list(CHAT_TOKENS), special_tokens=True)
    tokenizer.chat_template = LLAMA3_SHAPED_CHAT
    return tokenizer


def tiny_llava_config(tiny: TinyConfig, tokenizer) -> LlavaConfig:
    shape = dict(
        hidden_size=tiny.vision_width,
        intermediate_size=4 * tiny.vision_width,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
    )
    siglip = tiny.vision_type == "siglip"
    vision = (
        SiglipVisionConfig(**shape) if siglip else CLIPVisionConfig(**shape, projection_dim=tiny.vision_width)
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.llm_width,
        intermediate_size=int(2.6875 * tiny.llm_width),  # LLaMA-7B's 11008/4096 ratio
        num_hidden_layers=tiny.llm_layers,
        num_attention_heads=tiny.llm_heads,
        num_key_value_heads=tiny.llm_heads,
        max_position_embeddings=tiny.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if siglip else "default",  # SigLIP has no CLS to drop
        projector_hidden_act="gelu",
    )
