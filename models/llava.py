"""A LLaVA model assembled from HF parts, with compressors plugged in where they act.

    pixels → VisionTower [encoder compressor] → projector (MLP / TokenPacker / ...)
           [→ views laid out per image: thumbnail + crops, models/views.py]
           → merge into the text embeddings (one <image> id → N visual embeddings per sample)
           → [pre_llm compressors] → LanguageModel layers [in_llm compressors] → logits

The merge, padding, masks, positions, labels and KV cache are handled here and in
`sequence.py` / `llm.py` for every method, in training and in generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from data import IGNORE_INDEX
from data.subimages import Tiling
from models.compressors.base import Compressor, ModelDims, Progress, VisionFeatures
from models.llm import LanguageModel, next_positions
from models.sequence import RESPONSE, SequenceState, pad_rows, roles_of
from models.views import ImageTokens, MultiViewConfig, ViewArranger, ViewLayout
from models.vision import VisionTower


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None  # next-token loss over every target of the batch
    logits: torch.Tensor | None  # (B, T, V) when asked for, else None
    state: SequenceState  # the final sequence state (normed hidden states)
    visual_tokens_in: torch.Tensor  # (B,) visual tokens entering the LLM
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the components' own
    sample_loss: torch.Tensor | None = None  # (B,) each sample's mean loss, when asked for
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the components' figures to log


class VtcLlava(nn.Module):
    def __init__(
        self,
        vision: VisionTower,
        projector: Compressor,
        llm: LanguageModel,
        compressors: list[Compressor],
        image_token_id: int,
        dims: ModelDims,
        views: MultiViewConfig | None = None,
    ):
        super().__init__()
        if projector.stage != "projector":
            raise ValueError(f"{type(projector).__name__} is a {projector.stage} component, not a projector")
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.compressors = nn.ModuleList(compressors)
        self.image_token_id = image_token_id
        self.dims = dims
        # Images as thumbnail + crops (None: one view per image); holds the learned newline.
        self.views = ViewArranger(views, dims.llm_width) if views is not None else None
        for component in self.components():
            component.attach(self)

    def parts(self) -> dict[str, nn.Module]:
        """The parts a training stage freezes, trains or adapts with LoRA, by name. The views'
        newline token trains with the projector (as LLaVA-NeXT's `image_newline`)."""
        has_newline = self.views is not None and any(True for _ in self.views.parameters())
        return {
            "vision": self.vision,
            "projector": nn.ModuleList([self.projector, self.views]) if has_newline else self.projector,
            "compressors": self.compressors,
            "llm": self.llm,
        }

    def _stage(self, stage: str) -> list[Compressor]:
        return [c for c in self.compressors if c.stage == stage]

    def set_gradient_checkpointing(self, llm: bool, vision: bool) -> None:
        """Recompute activations in backward (when training with gradients only): every decoder
        layer (`llm`), every vision-encoder layer (`vision`), by HF's own switch on each."""
        for model, enabled in ((self.llm.body, llm), (self.vision.model, vision)):
            if enabled:
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            elif model.is_activation_checkpointing:
                model.activation_checkpointing_disable()

    def components(self) -> list[Compressor]:
        """The projector and every compressor."""
        return [self.projector, *self.compressors]

    def set_progress(self, progress: Progress | None) -> dict[str, float]:
        """Tell every component where training stands; their schedule states, keyed
        `component.key` (what the trainer logs)."""
        states = {}
        for component in self.components():
            name = getattr(component, "registry_name", type(component).__name__)
            states |= {f"{name}.{key}": value for key, value in component.set_progress(progress).items()}
        return states

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """The figures the components recorded during the last forward, keyed `component/name`."""
        return {
            f"{getattr(c, 'registry_name', type(c).__name__)}/{name}": value
            for c in self.components()
            for name, value in c.pop_metrics().items()
        }

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        """The losses the components added during the last forward, by name."""
        losses: dict[str, torch.Tensor] = {}
        for component in self.components():
            for name, value in component.pop_losses().items():
                if name in losses:
                    raise RuntimeError(f"two components add a loss named {name!r}")
                losses[name] = value
        return losses

    def visual_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Visual tokens per image that enter the LLM (expected number for dynamic methods);
        `grid` = (rows, cols) of crops of a multi-view image (model built with `views`)."""
        count = self.vision_patches()
        for component in self._stage("encoder"):
            count = component.output_tokens(count)
        count = self.projector.output_tokens(count)
        if grid is not None:
            count = self.views.tokens(grid, count, self._view_side())
        for component in self._stage("pre_llm"):
            count = component.output_tokens(count)
        return count

    def image_sequence_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens one image adds to the LLM's input: its visual tokens, and with crop indicators
        (models/views.py) the indicators' text (the budget a data set leaves for an image)."""
        text = self.views.text_tokens(grid) if grid is not None else 0
        return self.visual_tokens(grid) + text

    @property
    def view_grids(self) -> list[tuple[int, int]] | None:
        """Candidate crop grids when images enter as several views, else None."""
        return self.views.grids if self.views is not None else None

    @property
    def view_tiling(self) -> Tiling | None:
        """How images become views (grids + fit, for `data.dataset.load_views`), else None."""
        return self.views.config.tiling if self.views is not None else None

    def vision_patches(self) -> int:
        """Patches per view the vision tower emits (fewer than its own when a `pixels`
        component shrinks the image first)."""
        count = self.vision.num_patches
        for component in self._stage("pixels"):
            count = component.output_tokens(count)
        return count

    def resize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) views as the vision tower gets them: through the `pixels` components."""
        for component in self._stage("pixels"):
            pixel_values = component.resize(pixel_values)
        return pixel_values

    def _view_side(self) -> int | None:
        """Side of the square token map the projector emits per view (None: not a map)."""
        grid = None if self._stage("encoder") else math.isqrt(self.vision_patches())
        return self.projector.output_grid(grid)

    def encode_images(self, pixel_values: torch.Tensor, image_grids: torch.Tensor | None = None):
        """(V, 3, S, S) views → visual embeddings in the LLM's space: (I, N, H) when every image
        is one view; with `image_grids` (I, 2) = (rows, cols) per image, `pixel_values` holds each
        image's thumbnail then its rows·cols crops and the result is a list of I (N_i, H), or
        of I `ImageTokens` when crop indicators lie between the views."""
        features, layout = self.vision_features(pixel_values, image_grids)
        tokens = self.projector(features)
        if image_grids is None:
            return tokens
        return self.views.arrange(tokens, layout, self._view_side(), self.llm.embed)

    def vision_features(
        self, pixel_values: torch.Tensor, image_grids: torch.Tensor | None = None
    ) -> tuple[VisionFeatures, ViewLayout]:
        """The vision tower's features of (V, 3, S, S) views, with the encoder components acting
        in it, and the views' layout (`encode_images` takes the same arguments)."""
        if image_grids is not None and self.views is None:
            raise ValueError("image_grids given but this model was built without views")
        layout = (
            ViewLayout.from_grids(image_grids, pixel_values.device)
            if image_grids is not None
            else ViewLayout.single(pixel_values.shape[0], pixel_values.device)
        )
        encoders = self._stage("encoder")
        in_layers = [c for c in self.components() if c.acts_in_vision_layers]
        features = self.vision(
            self.resize_pixels(pixel_values),
            encoder=encoders[0] if encoders else None,
            in_layers=in_layers,
            views=layout,
        )
        return features, layout

    def merge(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> SequenceState:
        """Splice visual embeddings into the text: each `image_token_id` in `input_ids` (B, T)
        takes the next image's embeddings, in batch order, from `visual` — an (I, N, H) tensor or
        a list of I (N_i, H) tensors (images of different token counts) or `ImageTokens` (text
        inside an image's span: crop indicators, which are marked as text)."""
        embeds = self.llm.embed(input_ids.masked_fill(input_ids == self.image_token_id, 0))
        rows, image = [], 0
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids, emb = input_ids[b, real], embeds[b, real]
            lab = labels[b, real] if labels is not None else None
            pieces, vis, labs = [], [], []
            start = 0
            for pos in (ids == self.image_token_id).nonzero().flatten().tolist():
                if visual is None or image >= len(visual):
                    raise ValueError(f"sample {b} has more <image> tokens than images were given")
                tokens = visual[image]
                if isinstance(tokens, ImageTokens):
                    tokens, is_visual = tokens.embeds, tokens.is_visual.cpu()
                else:
                    is_visual = torch.ones(tokens.shape[0], dtype=torch.bool)
                pieces += [emb[start:pos], tokens.to(emb.dtype)]
                vis += [torch.zeros(pos - start, dtype=torch.bool), is_visual]
                if lab is not None:
                    labs += [lab[start:pos], lab.new_full((tokens.shape[0],), IGNORE_INDEX)]
                start, image = pos + 1, image + 1
            pieces.append(emb[start:])
            vis.append(torch.zeros(len(ids) - start, dtype=torch.bool))
            if lab is not None:
                labs.append(lab[start:])
            hidden = torch.cat(pieces)
            positions = torch.arange(hidden.shape[0], device=hidden.device)
            visual_mask = torch.cat(vis).to(hidden.device)
            row_labels = torch.cat(labs) if labs else None
            rows.append((hidden, positions, visual_mask, row_labels, roles_of(visual_mask, row_labels)))
        if visual is not None and image != len(visual):
            raise ValueError(f"{len(visual)} images given but only {image} <image> tokens in the batch")
        return pad_rows(rows, padding_side, labels is not None)

    def prepare(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        labels=None,
        padding_side="right",
        image_grids=None,
    ):
        """Vision → projector → merge → pre-LLM compressors. Returns the LLM's input state."""
        has_images = pixel_values is not None and len(pixel_values)
        visual = self.encode_images(pixel_values, image_grids) if has_images else None
        state = self.merge(input_ids, attention_mask, visual, labels, padding_side)
        for component in self._stage("pre_llm"):
            state = component(state)
        return state

    def forward(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        labels=None,
        return_logits=False,
        image_grids=None,
        lm_loss=True,
        per_sample=False,
    ) -> LlavaOutput:
        """Training / scoring forward. Inputs are right-padded: input_ids, attention_mask (B, T);
        pixel_values (V, 3, S, S), one view per <image> token (thumbnail + crops per image with
        image_grids, see encode_images); labels (B, T) unshifted targets. `lm_loss=False` skips
        the next-token loss (labels still mark the answers for the components); `per_sample`
        also returns each sample's mean loss (B,)."""
        self.pop_aux_losses()  # drop what an interrupted forward may have left behind
        self.pop_metrics()
        state = self.prepare(input_ids, attention_mask, pixel_values, labels, image_grids=image_grids)
        visual_in = state.num_visual
        in_llm = self._stage("in_llm")
        state = self.llm.run(state, in_llm)
        for component in in_llm:
            component.after_llm(state)
        loss = sample_loss = None
        if state.labels is not None and lm_loss:
            loss, sample_loss = next_token_loss(state, self.llm.lm_head, per_sample)
        logits = self.llm.lm_head(state.hidden) if return_logits else None
        return LlavaOutput(
            loss, logits, state, visual_in, self.pop_aux_losses(), sample_loss, self.pop_metrics()
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        max_new_tokens: int = 8,
        eos_token_id: int | Sequence[int] | None = None,
        image_grids=None,
    ) -> Generated:
        """Greedy decoding with KV cache. Prompts may be right- or left-padded (they are re-padded
        on the left). `eos_token_id`: the id, or ids (e.g. eos and a chat template's end of turn),
        that end an answer. Returns (B, max_new_tokens) new token ids (after a stop, the first
        stop id), the (B,) number of visual tokens that entered the LLM and the (B, L) number
        in each decoder layer's sequence in the prefill (`Generated`)."""
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        state = self.prepare(
            input_ids, attention_mask, pixel_values, padding_side="left", image_grids=image_grids
        )
        visual_in = state.num_visual
        kv = self.llm.new_kv(state)
        in_llm = self._stage("in_llm")
        state = self.llm.run(state, in_llm, kv)
        visual_layers = kv.visual_tokens()  # before decoding, whose steps add no visual token
        kv.next_position = next_positions(state)  # as the last layer saw them (a component may renumber)
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            logits = self.llm.lm_head(state.hidden[:, -1])
            logits[:, self.image_token_id] = float("-inf")  # a generated <image> would have no image
            next_token = logits.argmax(-1)
            if stops:
                next_token = next_token.masked_fill(done, stops[0])
                done |= torch.isin(next_token, next_token.new_tensor(stops))
            tokens.append(next_token)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            state = SequenceState(
                hidden=self.llm.embed(next_token[:, None]),
                attention_mask=torch.ones(batch, 1, dtype=torch.bool, device=input_ids.device),
                position_ids=kv.next_position[:, None].clone(),
                visual_mask=torch.zeros(batch, 1, dtype=torch.bool, device=input_ids.device),
                padding_side="left",
                role=torch.full((batch, 1), RESPONSE, dtype=torch.int8, device=input_ids.device),
            )
            kv.next_position += 1
            state = self.llm.run(state, in_llm, kv)
        out = torch.stack(tokens, 1)
        if out.shape[1] < max_new_tokens:
            fill = stops[0] if stops else 0
            out = F.pad(out, (0, max_new_tokens - out.shape[1]), value=fill)
        return Generated(out, visual_in, visual_layers)


class Generated(NamedTuple):
    """What `VtcLlava.generate` returns."""

    tokens: torch.Tensor  # (B, max_new_tokens) new token ids
    visual_in: torch.Tensor  # (B,) visual tokens that entered the LLM
    visual_layers: torch.Tensor  # (B, L) visual tokens in each decoder layer's sequence in the prefill


def next_token_loss(state: SequenceState, lm_head: nn.Module, per_sample: bool = False):
    """Cross-entropy of each labelled position's token given what precedes it, computing logits
    only where a target exists: (mean over the batch's targets, (B,) mean per sample or None).
    A sample without targets has loss 0."""
    targets = state.labels[:, 1:]
    where = targets != IGNORE_INDEX
    logits = lm_head(state.hidden[:, :-1][where]).float()
    if not where.any():
        zero = logits.sum() * 0.0
        return zero, zero.expand(targets.shape[0]) if per_sample else None
    token_loss = F.cross_entropy(logits, targets[where], reduction="none")
    if not per_sample:
        return token_loss.mean(), None
    rows = where.nonzero()[:, 0]
    totals = torch.zeros(targets.shape[0], device=token_loss.device).index_add(0, rows, token_loss)
    return token_loss.mean(), totals / where.sum(1).clamp(min=1)
