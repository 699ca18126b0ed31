"""The state that flows from the merge step through the LLM's layers.

Every compressor that acts on the LLM's input sequence (`pre_llm`, `in_llm`) receives and returns
a `SequenceState`. Its two operations, `keep` and `replace_visual`, change the sequence length per
sample and re-pad the batch, carrying attention mask, position ids, labels and the visual-token
mask along, so no compressor has to handle padding, ragged batches or labels itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from data import IGNORE_INDEX


@dataclass
class SequenceState:
    """A padded batch of sequences. B = batch, T = padded length, H = LLM width.

    hidden:         (B, T, H) embeddings / hidden states
    attention_mask: (B, T) bool, True at real tokens
    position_ids:   (B, T) long (float after position-averaging compressors), RoPE positions
    visual_mask:    (B, T) bool, True at visual tokens
    labels:         (B, T) long targets for each position's own token (unshifted), or None
    padding_side:   "right" (training) or "left" (generation: all prompts end at column T-1)
    attention:      (B, heads, T, T) attention probabilities of the layer just run, set only
                    when an in-LLM component asked for that layer's (Compressor.attention_layers)
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor
    labels: torch.Tensor | None = None
    padding_side: str = "right"
    attention: torch.Tensor | None = None

    @property
    def num_visual(self) -> torch.Tensor:
        """(B,) number of visual tokens per sample."""
        return (self.visual_mask & self.attention_mask).sum(1)

    def keep(self, keep: torch.Tensor) -> SequenceState:
        """Keep the real tokens where `keep` (B, T) is True, in order; re-pad to the longest."""
        keep = keep & self.attention_mask
        counts = keep.sum(1)
        length = int(counts.max()) if counts.numel() else 0
        # Stable sort puts kept positions first, in their original order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]
        column = torch.arange(length, device=keep.device)[None]
        if self.padding_side == "left":
            shift = (length - counts)[:, None]
            order = order.gather(1, (column - shift) % max(length, 1))
            valid = column >= shift
        else:
            valid = column < counts[:, None]
        return self._gather(order, valid)

    def last_index(self) -> torch.Tensor:
        """(B,) column of each sample's last real token, for either padding side."""
        columns = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device)
        return columns.expand_as(self.attention_mask).masked_fill(~self.attention_mask, -1).amax(1)

    def keep_top_visual(self, scores: torch.Tensor, k: int) -> SequenceState:
        """Keep each sample's k visual tokens with the highest `scores` (B, T), and all text."""
        visual = self.visual_mask & self.attention_mask
        ranked = scores.masked_fill(~visual, float("-inf"))
        top = ranked.topk(min(k, ranked.shape[1]), dim=1).indices
        keep = torch.zeros_like(visual).scatter_(1, top, True) & visual
        return self.keep(~visual | keep)

    def _gather(self, index: torch.Tensor, valid: torch.Tensor) -> SequenceState:
        def take(x):
            return x.gather(1, index)

        hidden = self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))
        labels = None
        if self.labels is not None:
            labels = take(self.labels).masked_fill(~valid, IGNORE_INDEX)
        return replace(
            self,
            attention=None,  # describes the old sequence
            hidden=hidden,
            attention_mask=valid,
            position_ids=take(self.position_ids),
            visual_mask=take(self.visual_mask) & valid,
            labels=labels,
        )

    def replace_visual(self, visual: torch.Tensor, positions: str = "renumber") -> SequenceState:
        """Replace each sample's visual tokens (one contiguous span) by `visual` (B, N', H).

        positions="renumber": real tokens get positions 0..n-1 again (as if the image had
        always produced N' tokens); "average": each new token takes the mean position of the
        span it replaces, split evenly (used by in-LLM pooling), text keeps its positions.
        """
        rows = []
        for b in range(visual.shape[0]):
            real = self.attention_mask[b]
            idx = (self.visual_mask[b] & real).nonzero().flatten()
            if idx.numel():
                start, end = int(idx[0]), int(idx[-1]) + 1
                if idx.numel() != end - start:
                    raise ValueError(
                        "replace_visual needs each sample's visual tokens to be one contiguous span"
                    )
                new = visual[b]
            else:  # a sample without an image: nothing to replace
                start = end = int(real.nonzero()[-1]) + 1
                new = visual[b, :0]
            rows.append(self._splice_row(b, start, end, new, positions))
        return pad_rows(rows, self.padding_side, self.labels is not None)

    def _splice_row(self, b, start, end, visual, positions):
        real = self.attention_mask[b]
        index = torch.arange(real.shape[0], device=real.device)
        before = (real & (index < start)).nonzero().flatten()
        after = (real & (index >= end)).nonzero().flatten()
        n = visual.shape[0]
        hidden = torch.cat([self.hidden[b, before], visual.to(self.hidden.dtype), self.hidden[b, after]])
        if positions == "renumber":
            pos = torch.arange(hidden.shape[0], device=hidden.device, dtype=self.position_ids.dtype)
        else:
            old = self.position_ids[b, start:end].float()
            groups = old.tensor_split(n) if n else []
            vis_pos = torch.stack([g.mean() for g in groups]) if n else old[:0]
            pos = torch.cat(
                [self.position_ids[b, before].float(), vis_pos, self.position_ids[b, after].float()]
            )
        vmask = torch.cat(
            [
                self.visual_mask[b, before],
                torch.ones(n, dtype=torch.bool, device=hidden.device),
                self.visual_mask[b, after],
            ]
        )
        labels = None
        if self.labels is not None:
            ign = torch.full((n,), IGNORE_INDEX, dtype=self.labels.dtype, device=hidden.device)
            labels = torch.cat([self.labels[b, before], ign, self.labels[b, after]])
        return hidden, pos, vmask, labels


def pad_rows(rows, padding_side: str, has_labels: bool, pad_value: float = 0.0) -> SequenceState:
    """Stack per-sample (hidden, positions, visual_mask, labels) rows into a padded state."""
    length = max(r[0].shape[0] for r in rows)
    batch = len(rows)
    ref = rows[0][0]
    hidden = ref.new_full((batch, length, ref.shape[-1]), pad_value)
    pos_dtype = torch.float32 if any(r[1].is_floating_point() for r in rows) else torch.long
    position_ids = torch.zeros(batch, length, dtype=pos_dtype, device=ref.device)
    attention_mask = torch.zeros(batch, length, dtype=torch.bool, device=ref.device)
    visual_mask = torch.zeros_like(attention_mask)
    labels = (
        torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=ref.device) if has_labels else None
    )
    for b, (h, p, v, lab) in enumerate(rows):
        n = h.shape[0]
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        hidden[b, cols], position_ids[b, cols], visual_mask[b, cols] = h, p.to(pos_dtype), v
        attention_mask[b, cols] = True
        if labels is not None:
            labels[b, cols] = lab
    return SequenceState(hidden, attention_mask, position_ids, visual_mask, labels, padding_side)


def attention_bias(key_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, Q, K) mask: the Q queries are the last Q of the K keys (cache + chunk);
    a query sees real keys at or before itself. Rows of padding queries are fully masked,
    which stays finite (the min value, not -inf), so no NaN reaches the loss."""
    total = key_mask.shape[1]
    key_index = torch.arange(total, device=key_mask.device)
    query_index = torch.arange(total - query_len, total, device=key_mask.device)
    allowed = (key_index[None, :] <= query_index[:, None])[None] & key_mask[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
