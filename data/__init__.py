"""vtc data: conversation templates, tokenizers, image preprocessing, shards, synthetic VQA."""

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
