"""Vision tower: an HF CLIP (or SigLIP) vision model, frozen or not, with hidden-state taps.

LLaVA-1.5 takes layer `feature_layer` (-2) of the tower and drops CLS ("default" strategy).
An encoder-stage compressor may append tokens to the ViT input (a forward hook on the
embeddings module, so the HF modules run unmodified) and choose which outputs to keep; one that
keeps only its own tokens of the last layer (`last_layer_rows`) gets that layer computed for
those rows only.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.compressors.base import Compressor, VisionFeatures
from models.lora import adapters_off
from models.views import ViewLayout


def prefix_tokens(vision_config) -> int:
    """Tokens before the patches in the tower's hidden states: SigLIP has no CLS, CLIP one."""
    return 0 if vision_config.model_type.startswith("siglip") else 1


def _after_attention(
    layer_idx: int, components: list[Compressor], views: ViewLayout, _module, args, kwargs, output
):
    """Forward hook on an encoder layer's self-attention: HF returns (output, weights) and the
    layer adds output to its residual stream next."""
    layer_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    attention_output, *rest = output
    for component in components:
        attention_output = component.after_vision_attention(layer_idx, layer_input, attention_output, views)
    return (attention_output, *rest)


def layer_rows(
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    rows: int,
    in_layers: list[Compressor],
    views: ViewLayout,
) -> torch.Tensor:
    """An HF CLIP / SigLIP encoder layer's output at the final `rows` positions only: (V, T, Dv)
    input → (V, rows, Dv). Those rows' queries attend to every key, as in the full layer; the
    other rows' queries, attention outputs and MLP are never computed. The in-layer components
    edit the attention output of these rows (`after_vision_attention` gets (V, rows, Dv))."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, _, width = normed.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (V, n, Dv) → (V, heads, n, Dv / heads)
        return t.view(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    query = split(attn.q_proj(normed[:, -rows:]))
    key, value = split(attn.k_proj(normed)), split(attn.v_proj(normed))
    dropout = attn.dropout if attn.training else 0.0
    mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=attn.scale)
    output = attn.out_proj(mixed.transpose(1, 2).reshape(batch, rows, width))
    for component in in_layers:
        output = component.after_vision_attention(layer_idx, normed, output, views)
    tail = hidden[:, -rows:] + output
    return tail + layer.mlp(layer.layer_norm2(tail))


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, feature_layer: int = -2, select_strategy: str = "default"):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', not {select_strategy!r}"
            )
        self.model = model
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        config = model.config
        self.grid = config.image_size // config.patch_size
        self.patch_size = config.patch_size
        self.prefix_tokens = prefix_tokens(config)
        tower = getattr(model, "vision_model", model)
        if getattr(tower, "use_head", False):
            # SigLIP's attention-pooling head: HF's forward computes it, LLaVA reads a hidden
            # state. Its weights stay (loaded and saved as they are); only the call is skipped.
            tower.use_head = False
        self._kept_hooks = []  # a checkpointed training call's hooks, until the next call

    def unused_prefixes(self, through_last_layer: bool = False) -> tuple[str, ...]:
        """Name prefixes (relative to this module) of parameters that cannot affect the features:
        encoder layers after the feature layer and the post-norm / pooling head (LLaVA reads a
        hidden state, not the pooled output). Training them would only waste optimizer state,
        and DDP rejects parameters that get no gradient. `through_last_layer`: a component reads
        the last layer's output (and SigLIP's post-norm), so every layer is used."""
        tower = getattr(self.model, "vision_model", None)
        root = "model.vision_model." if tower is not None else "model."
        tower = tower or self.model
        layers = len(tower.encoder.layers)
        used_layers = layers if through_last_layer else self.feature_layer % (layers + 1)
        unused = [
            f"{root}encoder.layers.{i}." for i in range(used_layers, layers)
        ]  # hidden_states[i] = output of layer i-1
        used = ("embeddings", "pre_layrnorm", "encoder") + (("post_layernorm",) if through_last_layer else ())
        unused += [f"{root}{name}." for name, _ in tower.named_children() if name not in used]
        return tuple(unused)

    def cls_attention(self, hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """At the feature layer: the attention CLS pays each patch, averaged over heads (B, N), and
        the patches' keys averaged over heads (B, N, head_dim). Recomputed for that one layer from
        its input and its own norm and projections, so the tower keeps its fast attention."""
        if not self.prefix_tokens:
            raise ValueError("this vision tower has no CLS token to read the attention of")
        index = self.feature_layer % len(hidden_states)  # hidden_states[index] = output of layer index-1
        layer = self.layers()[index - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_states[index - 1])
        batch, length, _ = x.shape
        heads = attn.num_heads
        q = attn.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)  # (B, h, 1, d)
        k = attn.k_proj(x).view(batch, length, heads, -1).transpose(1, 2)  # (B, h, T, d)
        probs = ((q @ k.transpose(-1, -2)).float() * attn.scale).softmax(-1)  # (B, h, 1, T)
        return probs.mean(1)[:, 0, 1:], k.mean(1)[:, 1:]

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def release_hooks(self) -> None:
        """Remove the per-call hooks a checkpointed training call kept for its backward."""
        for hook in self._kept_hooks:
            hook.remove()
        self._kept_hooks = []

    def _run_to_last_layer_rows(
        self,
        pixel_values: torch.Tensor,
        interpolate: bool,
        rows: int,
        in_layers: list[Compressor],
        views: ViewLayout,
    ) -> tuple[torch.Tensor, ...]:
        """The tower's hidden states as HF's forward gives them, but the last layer computes only
        the final `rows` rows: entry -1 is (V, rows, Dv). For an encoder component that reads
        only the tokens it appended of the last layer (FALCON's registers), the patches' outputs
        there would be thrown away: this saves most of one layer of the tower. The tower's own
        modules run in HF's order (embeddings, CLIP's pre-norm, the layers) with this call's
        hooks; only the last layer is taken apart (`layer_rows`)."""
        tower = getattr(self.model, "vision_model", self.model)
        hidden = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        if hasattr(tower, "pre_layrnorm"):  # CLIP; SigLIP has none
            hidden = tower.pre_layrnorm(hidden)
        states = [hidden]
        *body, last = self.layers()
        for layer in body:
            hidden = layer(hidden, None)  # no attention mask in a vision tower
            states.append(hidden)
        states.append(layer_rows(last, len(body), hidden, rows, in_layers, views))
        return tuple(states)

    def layers(self) -> list[nn.Module]:
        """The encoder's layers (HF CLIP / SigLIP `EncoderLayer`s), in order."""
        return list(getattr(self.model, "vision_model", self.model).encoder.layers)

    def forward(
        self,
        pixel_values: torch.Tensor,
        encoder: Compressor | None = None,
        in_layers: list[Compressor] = (),
        views: ViewLayout | None = None,
    ) -> VisionFeatures:
        """(B, 3, S, S) views → VisionFeatures with `selected` (B, N, Dv); S other than the
        tower's own size (a `pixels` component resized them) interpolates its position
        embeddings, N = (S / patch)². `in_layers`:
        components whose `after_vision_attention` edits every layer's attention output (for this
        call only). `views`: which image and crop each view is (default: one view per image)."""
        if views is None:
            views = ViewLayout.single(pixel_values.shape[0], pixel_values.device)
        grid = pixel_values.shape[-1] // self.patch_size
        plain = None
        if encoder is not None and encoder.wants_plain_features():
            with torch.no_grad(), adapters_off(self.model):  # before this call's hooks exist
                plain = self(pixel_values, views=views).selected
        self.release_hooks()
        hooks = []
        if encoder is not None:
            embeddings = getattr(self.model, "vision_model", self.model).embeddings
            hooks.append(
                embeddings.register_forward_hook(lambda _m, _i, out: encoder.extend_embeddings(out, views))
            )
        for idx, layer in enumerate(self.layers() if in_layers else []):
            hook = partial(_after_attention, idx, list(in_layers), views)
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        rows = encoder.last_layer_rows() if encoder is not None else None
        try:
            dtype = next(self.model.parameters()).dtype
            if rows:
                hidden_states = self._run_to_last_layer_rows(
                    pixel_values.to(dtype), grid != self.grid, rows, list(in_layers), views
                )
            else:
                resized = {"interpolate_pos_encoding": True} if grid != self.grid else {}
                out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **resized)
                hidden_states = out.hidden_states
        finally:
            if torch.is_grad_enabled() and self.model.is_activation_checkpointing:
                # checkpointed layers run their forward again in backward, hooks and all: keep
                # this call's hooks until the next call (a step's backward comes before it)
                self._kept_hooks = hooks
            else:
                for hook in hooks:
                    hook.remove()
        if encoder is not None:
            extra = {"plain": plain} if plain is not None else {}
            if encoder.uses_cls_attention:
                extra["cls_attention"], extra["keys"] = self.cls_attention(hidden_states)
            selected = encoder.select(hidden_states, grid * grid, views, **extra)
            return VisionFeatures(selected, hidden_states, None, self.prefix_tokens, views)
        selected = hidden_states[self.feature_layer]
        if self.select_strategy == "default":  # as transformers' Llava: drop the CLS token
            selected = selected[:, self.prefix_tokens :]
        return VisionFeatures(selected, hidden_states, grid, self.prefix_tokens, views)
