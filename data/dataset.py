"""Map-style dataset over shards: a sample → tokenized conversation + preprocessed image, and
the collate function that pads a batch.

Samples that cannot be used (undecodable image, malformed conversation, an `<image>` count
that does not match the image, answers that are empty or all unknown tokens, every supervised
token truncated away) are not trained on: the dataset returns a `Skipped(id, reason)` and the collate
function passes the skipped ids up with the batch, so the trainer counts and reports them even
when DataLoader workers run in other processes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from data import IGNORE_INDEX
from data.images import CLIP_MEAN, preprocess_image
from data.shards import ShardIndex
from data.subimages import Tiling, thumbnail, thumbnail_and_crops
from data.synth import region_targets
from data.templates import (
    ConversationError,
    Template,
    conversation_turns,
    get_template,
    placeholder_problem,
)


@dataclass(frozen=True)
class Skipped:
    id: str
    reason: str


def load_views(
    data: bytes, image_size: int, tiling: Tiling | None = None
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Decode an image: (3, S, S) and None, or with a `tiling` the thumbnail + crops
    (1 + rows·cols, 3, S, S) and the chosen (rows, cols); with a tiling without crops, the
    thumbnail alone (3, S, S) and None."""
    with Image.open(io.BytesIO(data)) as image:
        if tiling is None:
            return preprocess_image(image, image_size), None
        image.load()
        fill = tuple(int(255 * m) for m in CLIP_MEAN)
        if not tiling.crops:
            return preprocess_image(
                thumbnail(image.convert("RGB"), tiling.fit, image_size, fill), image_size
            ), None
        views, grid = thumbnail_and_crops(image, tiling, image_size, fill)
    return torch.stack([preprocess_image(v, image_size) for v in views]), grid


class ConversationDataset(torch.utils.data.Dataset):
    """Items: {id, input_ids, labels, pixel_values (3,S,S) or None, region_targets or None}
    (with a `tiling`: pixel_values (1 + rows·cols, 3, S, S) and image_grid (rows, cols)).

    `max_length` bounds the LLM sequence *including* the visual tokens each image expands to:
    `visual_tokens` per image, as the model's compressors emit them — a number, or for multi-view images a
    function of the image's (rows, cols). `turns` keeps only the first that many question-answer
    turns of each conversation (None: all); a sample whose `<image>` is in a later turn is then
    skipped as malformed."""

    def __init__(
        self,
        shards: ShardIndex,
        tokenizer,
        template: str | Template,
        image_size: int,
        image_token_id: int,
        max_length: int,
        visual_tokens,
        with_regions: int | None = None,
        tiling: Tiling | None = None,
        turns: int | None = None,
    ):
        self.shards = shards
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.template.check(tokenizer)  # a template the tokenizer cannot serve fails here, not per sample
        self.image_size = image_size
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.visual_tokens = visual_tokens
        self.with_regions = with_regions  # patch grid size, for the dense vision objective
        self.tiling = tiling
        self.turns = turns

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int):
        sample_id = f"<sample {index}>"
        try:
            record = self.shards.record(index)
            if not isinstance(record, dict):
                raise ConversationError(f"the sample's JSON is a {type(record).__name__}, not an object")
            sample_id = str(record.get("id", sample_id))
            pixel_values, grid = self._image(index)
            conversations = record["conversations"]
            if self.turns is not None and isinstance(conversations, list):
                conversations = conversations[: 2 * self.turns]
            if self.template.name == "plain" and "caption" in record:  # synthetic data: dense captions
                conversations = [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": record["caption"]},
                ]
            self._check(conversations, has_image=pixel_values is not None)
            tokens = self.visual_tokens(grid) if callable(self.visual_tokens) else self.visual_tokens
            budget = self.max_length - (tokens - 1) * (pixel_values is not None)
            if budget <= 0:
                raise ValueError(
                    f"max_length={self.max_length} leaves no room for text after {tokens} visual tokens"
                )
            encoded = self.template.encode(conversations, self.tokenizer, self.image_token_id, budget)
        except (
            ConversationError,
            OSError,
            SyntaxError,
            ValueError,
            KeyError,
            Image.DecompressionBombError,
        ) as err:
            return Skipped(sample_id, f"{type(err).__name__}: {err}")
        if encoded.num_supervised == 0 and not self.with_regions:
            return Skipped(sample_id, f"no supervised tokens left within max_length={self.max_length}")
        item = {
            "id": sample_id,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixel_values,
        }
        if grid is not None:
            item["image_grid"] = grid
        if self.with_regions:
            item["region_targets"] = torch.tensor(region_targets(record["scene"], self.with_regions))
        return item

    def _check(self, conversations, has_image: bool) -> None:
        """ConversationError for what would stop the model or teach it nothing: an image whose
        questions do not hold exactly one `<image>`, a placeholder without an image, answers
        that are all empty or unknown tokens."""
        pairs = conversation_turns(conversations)
        problem = placeholder_problem(pairs, has_image)
        if problem:
            raise ConversationError(problem[1])
        unknown = self.tokenizer.unk_token_id
        answers = " ".join(a for _, a in pairs)
        if not any(i != unknown for i in self.tokenizer(answers, add_special_tokens=False).input_ids):
            raise ConversationError("every answer is empty or made only of unknown tokens")

    def _image(self, index: int) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        data = self.shards.image_bytes(index)
        if data is None:
            return None, None
        return load_views(data, self.image_size, self.tiling)


def collate(items: list, pad_token_id: int) -> dict:
    """Right-pads a list of dataset items into a batch; skipped items only leave their ids."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    items = [item for item in items if not isinstance(item, Skipped)]
    batch: dict = {"skipped": [(s.id, s.reason) for s in skipped], "ids": [item["id"] for item in items]}
    if not items:
        return batch
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.bool)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[b, :n] = torch.tensor(item["input_ids"])
        labels[b, :n] = torch.tensor(item["labels"])
        attention_mask[b, :n] = True
    images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    grids = [item["image_grid"] for item in items if "image_grid" in item]
    if grids:  # multi-view: each image's thumbnail and crops, one image after another
        batch["image_grids"] = torch.tensor(grids)
    pixel_values = (torch.cat(images) if grids else torch.stack(images)) if images else None
    batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask, pixel_values=pixel_values)
    if "region_targets" in items[0]:
        batch["region_targets"] = torch.stack([item["region_targets"] for item in items])
    return batch
