"""The state that flows from the merge step through the LLM's layers.

Every compressor that acts on the LLM's input sequence (`pre_llm`, `in_llm`) receives and returns
a `SequenceState`. Its two operations, `keep` and `replace_visual`, change the sequence length per
sample and re-pad the batch, carrying attention mask, position ids, labels, the visual-token
mask and each position's role along, so no compressor has to handle padding, ragged batches or
labels itself.

Roles say where the prompt ends, under any template and any number of turns:

    CONTEXT   text before the image (system prompt, `USER:`)
    VISUAL    the image's tokens
    PROMPT    text after the image up to the first answer token (the instruction, `ASSISTANT:`)
    RESPONSE  the first answer token and everything after it (answers, later turns)

so a text-conditioned method reads `prompt_mask` / `last_prompt_index()` and never sees an
answer. Answers are found from the labels (training); a prompt being generated from has none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from data import IGNORE_INDEX

CONTEXT, VISUAL, PROMPT, RESPONSE = 0, 1, 2, 3  # SequenceState.role values


def roles_of(visual: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Roles (T,) int8 of one unpadded sample from its visual mask (T,) and labels (T,) or None."""
    index = torch.arange(visual.shape[0], device=visual.device)
    role = torch.full_like(index, CONTEXT, dtype=torch.int8)
    if visual.any():
        role[index > index[visual].max()] = PROMPT
    if labels is not None and (labels != IGNORE_INDEX).any():
        role[index >= index[labels != IGNORE_INDEX].min()] = RESPONSE
    role[visual] = VISUAL
    return role


@dataclass
class AttentionRows:
    """Attention probabilities of a few query rows of one layer (never the whole T×T matrix).

    probs: (B, heads, Q, T) float32, the rows of queries `rows` (B, Q); `valid` (B, Q) marks the
    real ones (samples may have fewer queries than Q)."""

    probs: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor

    def received(self) -> torch.Tensor:
        """(B, T) attention each key received, averaged over heads and the valid query rows."""
        per_row = self.probs.mean(1) * self.valid[..., None]  # (B, Q, T)
        return per_row.sum(1) / self.valid.sum(1, keepdim=True).clamp(min=1)


@dataclass
class SequenceState:
    """A padded batch of sequences. B = batch, T = padded length, H = LLM width.

    hidden:         (B, T, H) embeddings / hidden states
    attention_mask: (B, T) bool, True at real tokens
    position_ids:   (B, T) long (float after position-averaging compressors), RoPE positions
    visual_mask:    (B, T) bool, True at visual tokens
    labels:         (B, T) long targets for each position's own token (unshifted), or None
    padding_side:   "right" (training) or "left" (generation: all prompts end at column T-1)
    attention:      {id(component): AttentionRows} of the layer just run, for the in-LLM
                    components that asked for that layer's (Compressor.attention_layers)
    role:           (B, T) int8, CONTEXT / VISUAL / PROMPT / RESPONSE of each position (None,
                    e.g. a state built by hand: derived from visual_mask, with no answers)
    key_mask:       (B, T) bool, the positions later layers may attend to (None: every real
                    one); `hide_visual_keys` sets it
    key_bias:       (B, T) float added to every query's attention score of each key in later
                    layers (a soft mask, e.g. log-retention of visual tokens; training passes
                    only), or None
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor
    labels: torch.Tensor | None = None
    padding_side: str = "right"
    attention: dict[int, AttentionRows] | None = None
    role: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None

    def hide_visual_keys(self) -> SequenceState:
        """The same sequence, but the layers run on it no longer attend to its visual tokens
        (the tokens stay, so positions and the KV cache keep their layout). With a KV cache,
        the keys of these positions are hidden in the layers that run on this state."""
        return replace(self, key_mask=self.attention_mask & ~self.visual_mask)

    @property
    def prompt_mask(self) -> torch.Tensor:
        """(B, T) bool: the instruction text after the image, before any answer token."""
        return (self._roles() == PROMPT) & self.attention_mask

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T) bool: the first answer token and everything after it."""
        return (self._roles() == RESPONSE) & self.attention_mask

    def last_prompt_index(self) -> torch.Tensor:
        """(B,) column of each sample's last real token before its first answer token: the one
        whose output predicts the answer (the last real token when there is no answer yet)."""
        columns = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device)
        before = self.attention_mask & (self._roles() != RESPONSE)
        return columns.expand_as(before).masked_fill(~before, -1).amax(1)

    def _roles(self) -> torch.Tensor:
        """`role`, or for a state built without one: text after the image is prompt, no answers."""
        if self.role is not None:
            return self.role
        index = torch.arange(self.visual_mask.shape[1], device=self.visual_mask.device).expand_as(
            self.visual_mask
        )
        last_visual = index.masked_fill(~self.visual_mask, -1).amax(1, keepdim=True)
        after = (index > last_visual) & (last_visual >= 0)
        role = torch.where(after, PROMPT, CONTEXT).to(torch.int8)
        return role.masked_fill(self.visual_mask, VISUAL)

    def text_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every real text position before the first answer, as rows (B, Q) and a validity mask
        (B, Q) (samples have different numbers of them): the queries of text-conditioned ranking."""
        return positions_of(self.attention_mask & ~self.visual_mask & (self._roles() != RESPONSE))

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

    def keep_top_visual(self, scores: torch.Tensor, k) -> SequenceState:
        """Keep each sample's k visual tokens with the highest `scores` (B, T), and all text;
        `k` is an int or a (B,) tensor (a count per sample)."""
        visual = self.visual_mask & self.attention_mask
        ranked = scores.masked_fill(~visual, float("-inf"))
        per_sample = torch.as_tensor(k, device=scores.device).expand(scores.shape[0])
        top = ranked.topk(min(int(per_sample.max()), ranked.shape[1]), dim=1).indices
        within = torch.arange(top.shape[1], device=top.device)[None] < per_sample[:, None]
        keep = torch.zeros_like(visual).scatter_(1, top, within) & visual
        return self.keep(~visual | keep)

    def _gather(
        self, index: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> SequenceState:
        """The state at columns `index` (B, W) of each row, `valid` (B, W) marking the real ones;
        `hidden` (B, W, H): the new rows' hidden states when the caller computed them."""

        def take(x):
            return x.gather(1, index)

        if hidden is None:
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
            role=None if self.role is None else take(self.role).masked_fill(~valid, CONTEXT),
            key_mask=None if self.key_mask is None else take(self.key_mask) & valid,
            key_bias=None if self.key_bias is None else take(self.key_bias).masked_fill(~valid, 0.0),
        )

    def visual_spans(self, b: int) -> list[tuple[int, int]]:
        """[start, end) columns of sample b's runs of real visual tokens, in order: one per image,
        or one per view when text lies between an image's views (crop indicators)."""
        visual = (self.visual_mask[b] & self.attention_mask[b]).to(torch.int8)
        edges = torch.diff(visual, prepend=visual.new_zeros(1), append=visual.new_zeros(1))
        starts = (edges == 1).nonzero().flatten().tolist()
        ends = (edges == -1).nonzero().flatten().tolist()
        return list(zip(starts, ends, strict=True))

    def pool_visual(self, stride: int, positions: str = "exact") -> SequenceState:
        """Each run of real visual tokens (`visual_spans`) average-pooled in order with kernel =
        stride = S: a run of L tokens becomes ⌈L/S⌉, the last one the mean of the L mod S left
        over when S does not divide L; text is untouched and the batch re-padded. One batched
        pass over (B, T), whatever the runs' lengths and the padding side (a per-sample loop of
        small operations would cost a visible share of a small model's step).

        positions: "exact" — a pooled token's position is its group's float mean (positions
        become float32); "float16" — the mean of its group's positions cast to float16, itself
        cast to float16 and truncated to an integer (LLaVolta's authors); "renumber" — the real
        tokens are numbered 0..n-1 again, as if the image had produced fewer tokens. Padding
        gets zeros, label IGNORE_INDEX and role CONTEXT, as `pad_rows` gives it."""
        if positions not in ("exact", "float16", "renumber"):
            raise ValueError(f"positions must be 'exact', 'float16' or 'renumber', not {positions!r}")
        if self.key_mask is not None or self.key_bias is not None:
            raise ValueError("pool_visual on a state with hidden or biased keys: pool first")
        real = self.attention_mask
        visual = self.visual_mask & real
        batch, length = real.shape
        device = real.device
        column = torch.arange(length, device=device).expand(batch, length)
        run_starts = visual & ~torch.nn.functional.pad(visual[:, :-1], (1, 0))
        offset = column - torch.where(run_starts, column, 0).cummax(1).values  # within the run
        opens = real & (~visual | (offset % stride == 0))  # the first member of each new token
        counts = opens.sum(1)  # (B,) new lengths
        width = int(counts.max())
        slot = opens.cumsum(1) - 1  # each real token's new column
        if self.padding_side == "left":
            slot = slot + (width - counts)[:, None]
        trash = batch * width  # padding goes to one extra row, dropped
        target = torch.where(real, slot + width * torch.arange(batch, device=device)[:, None], trash)
        target = target.flatten()
        size = torch.zeros(trash + 1, device=device).index_add(0, target, real.flatten().float())[:-1]
        hidden = self.hidden.new_zeros(trash + 1, self.hidden.shape[-1]).index_add(
            0, target, self.hidden.flatten(0, 1)
        )[:-1] / size.clamp_min(1)[:, None].to(self.hidden.dtype)
        new_columns = torch.arange(width, device=device)[None]
        valid = (
            new_columns >= (width - counts)[:, None]
            if self.padding_side == "left"
            else new_columns < counts[:, None]
        )
        first = torch.zeros(trash + 1, dtype=torch.long, device=device)  # each new token's first
        first[target[opens.flatten()]] = column[opens]  # member: its text, label, role, masks
        pooled = self._gather(first[:-1].view(batch, width), valid, hidden.view(batch, width, -1))
        return replace(pooled, position_ids=self._pooled_positions(positions, target, size, pooled))

    def _pooled_positions(self, mode, target, size, pooled: SequenceState) -> torch.Tensor:
        """`pool_visual`'s new position ids (B, W): text keeps its own (`pooled` holds each new
        token's first member's); see `positions` there."""
        old, valid = self.position_ids, pooled.attention_mask
        if mode == "renumber":
            return ((valid.cumsum(1) - 1) * valid).to(old.dtype)
        summed = old.flatten().half().float() if mode == "float16" else old.flatten().float()
        rows = size.shape[0]  # B·W; `target` sends padding to row B·W, dropped
        mean = torch.zeros(rows + 1, device=old.device).index_add(0, target, summed)[:-1]
        mean = (mean / size.clamp_min(1)).view(valid.shape)
        if mode == "exact":
            means, dtype = mean, torch.float32
        else:
            dtype = torch.float32 if old.is_floating_point() else torch.long
            means = mean.half().long().to(dtype)
        text = pooled.position_ids.to(dtype)
        return torch.where(pooled.visual_mask, means, text).masked_fill(~valid, 0)

    def replace_visual(self, visual, positions="renumber") -> SequenceState:
        """Replace each sample's visual tokens by `visual`: (B, N', H), or a list of B (N'_b, H)
        when samples get different numbers of tokens — each replacing the sample's one span of
        visual tokens; or a list of B lists of tensors, one per span (`visual_spans`), for
        samples whose image is split by text.

        positions="renumber": real tokens get positions 0..n-1 again (as if the image had
        always produced N' tokens); "average": each new token takes the mean position of the
        span it replaces, split evenly, text keeps its positions; a list of B (N'_b,) tensors:
        the new tokens' positions (long or float; all of a sample's spans, in order), text keeps
        its positions.
        """
        if self.key_mask is not None or self.key_bias is not None:
            raise ValueError("replace_visual on a state with hidden or biased keys: replace first")
        rows = []
        for b in range(len(visual)):
            spans = self.visual_spans(b)
            new = visual[b]
            if isinstance(new, torch.Tensor):
                if len(spans) > 1:
                    raise ValueError(
                        f"sample {b} has {len(spans)} spans of visual tokens (text inside its image): "
                        "give one replacement per span"
                    )
                new = [new] if spans else []  # a sample without an image: nothing to replace
            elif len(new) != len(spans):
                raise ValueError(
                    f"sample {b} has {len(spans)} spans of visual tokens, got {len(new)} replacements"
                )
            where = positions if isinstance(positions, str) else positions[b]
            rows.append(self._splice_row(b, spans, new, where))
        return pad_rows(rows, self.padding_side, self.labels is not None, has_roles=self.role is not None)

    def _splice_row(self, b, spans, news, positions):
        """Sample b's real tokens with each span [start, end) of `spans` replaced by the tokens of
        `news` (one (n_i, H) per span): (hidden, positions, visual_mask, labels, role)."""
        real = self.attention_mask[b]
        device = real.device
        index = torch.arange(real.shape[0], device=device)
        bounds = [0, *(column for span in spans for column in span), real.shape[0]]
        texts = [  # the real columns before, between and after the spans
            (real & (index >= lo) & (index < hi)).nonzero().flatten()
            for lo, hi in zip(bounds[::2], bounds[1::2], strict=True)
        ]
        sizes = [new.shape[0] for new in news]
        if isinstance(positions, str) and positions == "average":  # each span split evenly
            given = [
                torch.stack([g.mean() for g in self.position_ids[b, start:end].float().tensor_split(n)])
                if n
                else torch.zeros(0, device=device)
                for (start, end), n in zip(spans, sizes, strict=True)
            ]
        elif isinstance(positions, str):  # "renumber": set below, once the row is laid out
            given = [None] * len(spans)
        else:
            given = list(positions[: sum(sizes)].to(device).split(sizes))

        def text(columns):
            labels = self.labels[b, columns] if self.labels is not None else None
            role = self.role[b, columns] if self.role is not None else None
            return (
                self.hidden[b, columns],
                self.position_ids[b, columns],
                self.visual_mask[b, columns],
                labels,
                role,
            )

        def new(i):
            n = sizes[i]
            labels = role = None
            if self.labels is not None:
                labels = torch.full((n,), IGNORE_INDEX, dtype=self.labels.dtype, device=device)
            if self.role is not None:
                role = torch.full((n,), VISUAL, dtype=self.role.dtype, device=device)
            ones = torch.ones(n, dtype=torch.bool, device=device)
            return news[i].to(self.hidden.dtype), given[i], ones, labels, role

        parts = [text(texts[0])]
        for i in range(len(spans)):
            parts += [new(i), text(texts[i + 1])]
        hidden, pos, vmask, labels, role = zip(*parts, strict=True)
        hidden = torch.cat(hidden)
        if isinstance(positions, str) and positions == "renumber":
            positions = torch.arange(hidden.shape[0], device=device, dtype=self.position_ids.dtype)
        else:
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in pos])
            positions = torch.cat([p.to(dtype) for p in pos])
        return (
            hidden,
            positions,
            torch.cat(vmask),
            torch.cat(labels) if self.labels is not None else None,
            torch.cat(role) if self.role is not None else None,
        )


def positions_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns where `mask` (B, T) is True, in order, as (B, M) indices and a (B, M) validity
    mask (M = the most any sample has, at least 1; invalid entries point at column 0 or later)."""
    counts = mask.sum(1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, : max(1, int(counts.max()))]
    valid = torch.arange(order.shape[1], device=order.device)[None] < counts[:, None]
    return order, valid


def pad_rows(
    rows, padding_side: str, has_labels: bool, pad_value: float = 0.0, has_roles: bool = True
) -> SequenceState:
    """Stack per-sample (hidden, positions, visual_mask, labels, roles) rows into a padded state
    (padding has role CONTEXT and label IGNORE_INDEX)."""
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
    role = torch.full((batch, length), CONTEXT, dtype=torch.int8, device=ref.device) if has_roles else None
    for b, (h, p, v, lab, r) in enumerate(rows):
        n = h.shape[0]
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        hidden[b, cols], position_ids[b, cols], visual_mask[b, cols] = h, p.to(pos_dtype), v
        attention_mask[b, cols] = True
        if labels is not None:
            labels[b, cols] = lab
        if role is not None:
            role[b, cols] = r
    return SequenceState(hidden, attention_mask, position_ids, visual_mask, labels, padding_side, role=role)


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
