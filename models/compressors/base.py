"""The one interface every compressor and projector implements.

A component declares where it acts (`stage`) and how many visual tokens it emits
(`output_tokens`). The model assembly calls it at that place:

- "pixels":    before the vision tower. `resize(pixel_values)` (B, 3, S, S) → (B, 3, S', S'),
               S' a multiple of the patch size; the tower interpolates its position embeddings
               to the new size and emits (S'/patch)² patches instead of (S/patch)².
- "encoder":   inside the vision tower. `extend_embeddings` appends extra tokens (e.g. registers)
               to the ViT input (B, 1+N, Dv) → (B, 1+N+M, Dv); `select` picks the output
               tokens from the tower's hidden states → (B, M, Dv) (with `uses_cls_attention`,
               also given the feature layer's CLS attention (B, N) and keys (B, N, d)).
               B counts views: both also get the `ViewLayout` (models/views.py) saying which
               image and crop each view is.
- "projector": the projector slot. `forward(features)` maps `VisionFeatures` → (B, N', H);
               `output_grid` says whether its tokens form a square map (how multi-view images
               are laid out for the LLM).
- "pre_llm":   `forward(state)` on the merged `SequenceState` before the first decoder layer.
- "in_llm":    `before_layer(layer_idx, state)` before every decoder layer; returns the state
               (shortened or not). Must be a no-op on a state without visual tokens (decoding).

Whatever its stage, a component can also

- bring its own training losses: declare their names in `aux_losses` and call
  `self.add_loss(name, value)` in its forward; a stage whose recipe objective is `aux` or
  `lm+aux` (train/objectives.py) minimises them, each logged under its own name;
- follow a schedule over training: `set_progress(progress)` is called before every training
  step with the stage's `Progress` (None outside training) and returns the schedule state to log;
- act inside every vision-encoder layer: with `acts_in_vision_layers`, `after_vision_attention`
  gets each layer's self-attention output before the residual add, and the views' layout
  (per-call hooks on this model's layers, nothing global);
- read the host once it is assembled: `attach(host)` (e.g. to start from a copy of a layer's
  attention; wrap reads in `models.gather.gathered` so they also work under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from models.views import ViewLayout

Stage = Literal["pixels", "encoder", "projector", "pre_llm", "in_llm"]
STAGES: tuple[str, ...] = ("pixels", "encoder", "projector", "pre_llm", "in_llm")


@dataclass(frozen=True)
class ModelDims:
    """What a component needs to know about the host model to size itself."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    grid: int  # patches per side of the base image (24 for CLIP-L/336)
    llm_width: int
    llm_layers: int
    llm_heads: int
    # Tokens before the patches in the tower's hidden states: CLIP's CLS (1), none in SigLIP (0).
    # A hidden state is [prefix | grid² patches | tokens an encoder component appended].
    prefix_tokens: int = 1


@dataclass
class VisionFeatures:
    """Output of the vision tower for a batch of images.

    selected:      (B, N, Dv) the tokens LLaVA feeds the projector (layer -2, CLS dropped), or an
                   encoder compressor's selected tokens
    hidden_states: tuple of (B, P+N(+M), Dv), entry 0 = embeddings (HF convention): P prefix
                   tokens (CLS), N patches, M appended by an encoder component
    grid:          patches per side when `selected` is a full patch grid, else None
    prefix_tokens: P
    views:         which image and crop each of the B views is (None: one view per image)
    """

    selected: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    grid: int | None
    prefix_tokens: int = 1
    views: ViewLayout | None = None

    def patches(self, index: int, count: int) -> torch.Tensor:
        """The `count` patch tokens of hidden state `index`: (B, count, Dv)."""
        return self.hidden_states[index][:, self.prefix_tokens : self.prefix_tokens + count]


@dataclass(frozen=True)
class Progress:
    """Where training stands within the current stage, from the trainer's global step (so a
    resumed run is at the very same point of every schedule as the run it continues)."""

    step: int  # optimizer steps done in this stage
    total: int  # optimizer steps the stage will take
    # the loss terms the stage minimises (e.g. ("lm",) or ("scorer_mse",)): a component computes
    # only what its stage's objective uses (no teacher pass when its loss is not trained)
    terms: tuple[str, ...] = ()
    # settings the stage gives its components for its duration (`stages[i].components`):
    # {component name: {setting: value}}; read through `Compressor.setting`
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """step / total, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total))


@dataclass(frozen=True)
class NoParams:
    """Config of a component without parameters."""


class Compressor(nn.Module):
    stage: ClassVar[str]
    Config: ClassVar[type] = NoParams

    # names of the losses `forward` / `before_layer` may add with `add_loss` (objective `aux`)
    aux_losses: ClassVar[tuple[str, ...]] = ()
    # True if some of its parameters get no gradient in some steps (e.g. one router per layer,
    # only one of which learns per step): DDP then looks for unused parameters every step
    sparse_gradients: ClassVar[bool] = False
    # True if each training step gives gradients to a different part of it (DyVTE: the drawn
    # layer's router). torch's optimizers leave a part without a gradient where it is, on one
    # device or under DDP; DeepSpeed's steps every trainable parameter every step, with a zero
    # gradient where there is none, so momentum and weight decay would move the parts the step
    # did not train: a stage training it is refused under DeepSpeed (`check_recipe`)
    trains_one_part_per_step: ClassVar[bool] = False
    # True if, in training, it scores the answer tokens through the LM head itself (DyVTE's exit
    # labels): `vtc plan` then counts those scores' memory in a stage without the next-token loss
    scores_answers: ClassVar[bool] = False

    def __init__(self, config, dims: ModelDims):
        super().__init__()
        self.config = config
        self.dims = dims
        self.progress: Progress | None = None  # None: not training (inference setting)
        self.host = None  # the VtcLlava holding this component, once assembled (`attach`)
        self._losses: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, torch.Tensor] = {}

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Record a scalar training loss of this forward pass under a name of `aux_losses`."""
        if name not in self.aux_losses:
            raise RuntimeError(
                f"{type(self).__name__} adds loss {name!r}, not in its aux_losses {self.aux_losses}"
            )
        self._losses[name] = value

    def pop_losses(self) -> dict[str, torch.Tensor]:
        """The losses added since the last call (the model collects them after each forward)."""
        losses, self._losses = self._losses, {}
        return losses

    def add_metric(self, name: str, value: torch.Tensor | float) -> None:
        """Record a figure of this forward pass to log (as `train/<component>/<name>`), never
        minimised."""
        self._metrics[name] = torch.as_tensor(value).detach().float()

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def after_llm(self, state) -> None:
        """Called after a forward's last decoder layer with its final (normed) `SequenceState`
        (training and scoring forwards, not generation): e.g. to compare with a continuation
        the component ran itself."""

    def statistics(self) -> dict:
        """What this component counted since `reset_statistics` (e.g. exit layers), for reports."""
        return {}

    def reset_statistics(self) -> None:
        """Start counting anew (before an evaluation)."""

    def statistics_state(self) -> dict | None:
        """The counts behind `statistics`, as JSON: saved with each batch of answers of an
        evaluation row under way, so that a row stopped half-way goes on counting from them
        (`load_statistics_state`) over the questions it had not answered. {} where nothing is
        counted; None, the default for a component that overrides `statistics` without this,
        has such a row measured again from its first question."""
        counts = type(self).statistics is not Compressor.statistics
        return None if counts else {}

    def load_statistics_state(self, state: dict) -> None:
        """Go on counting from `state`, what `statistics_state` returned."""

    # config fields a training stage may set for its own duration (`stages[i].components`):
    # behaviour only, never the shape of a weight
    stage_settings: ClassVar[tuple[str, ...]] = ()

    def setting(self, name: str, progress: Progress | None = None):
        """The config value `name` as the current training stage sets it (or the stage of
        `progress`, where given), else the config's own (outside training, in evaluation and
        export, the config's value holds)."""
        progress = progress if progress is not None else getattr(self, "progress", None)
        staged = progress.settings.get(getattr(self, "registry_name", ""), {}) if progress else {}
        return staged.get(name, getattr(self.config, name))

    def training_terms(self) -> tuple[str, ...]:
        """The loss terms the current training stage minimises; () in eval mode or outside
        training, so a component computes a loss (and its teacher pass) only when it is used."""
        return self.progress.terms if self.training and self.progress is not None else ()

    def set_progress(self, progress: Progress | None) -> dict[str, float]:
        """Called before every training step (None when training ends or outside training).
        Returns the schedule's state to log, e.g. {"stride": 8.0}; the default has none."""
        self.progress = progress
        return {}

    def describe(self, progress: Progress) -> list[str]:
        """Lines printed when a training stage starts, given its progress at its first step (its
        `total` optimizer steps, the settings it gives; e.g. the phases of a schedule); the
        default prints nothing."""
        return []

    def output_tokens(self, input_tokens: int) -> int:
        """Visual tokens this component emits (for dynamic ones: the expected number) when
        `input_tokens` tokens come in."""
        return input_tokens

    # pixels stage
    def resize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # projector stage
    def output_grid(self, grid: int | None) -> int | None:
        """Side of the square token map emitted for a grid × grid patch map, or None when the
        tokens are not such a map (multi-view images are then laid out view by view). The
        default: a map when the token count is unchanged."""
        if grid is None:
            return None
        return grid if self.output_tokens(grid * grid) == grid * grid else None

    # encoder stage
    uses_cls_attention: ClassVar[bool] = False  # select() also gets cls_attention= and keys=
    # select() reads the tower's last layer (not only up to LLaVA's feature layer): every
    # encoder layer then trains when the tower does
    reads_last_vision_layer: ClassVar[bool] = False

    def last_layer_rows(self) -> int | None:
        """How many final rows of the tower's last layer select() reads, when that is all it
        reads of that layer (e.g. the tokens it appended), else None. The tower then computes
        only those rows of its last layer, each row's query against every key, and hidden state
        -1 holds just them."""
        return None

    def wants_plain_features(self) -> bool:
        """True when select() should also get `plain=` (V, N, Dv): the tower's own features of
        these views (LLaVA's feature layer and selection, no component, LoRA adapters off, no
        gradient), e.g. as a target the component's outputs learn to match. Costs one more
        tower pass, so a component asks only when it uses them (typically while training)."""
        return False

    def extend_embeddings(self, embeddings: torch.Tensor, views: ViewLayout) -> torch.Tensor:
        raise NotImplementedError

    def select(
        self, hidden_states: tuple[torch.Tensor, ...], num_patches: int, views: ViewLayout
    ) -> torch.Tensor:
        raise NotImplementedError

    # any stage: inside the vision encoder's layers
    acts_in_vision_layers: ClassVar[bool] = False

    def after_vision_attention(
        self, layer_idx: int, layer_input: torch.Tensor, attention_output: torch.Tensor, views: ViewLayout
    ) -> torch.Tensor:
        """Encoder layer `layer_idx`'s self-attention output (B, T, Dv), before it is added to
        the residual stream; `layer_input` (B, T, Dv) is what the attention read (after the
        layer's first norm); B counts views, laid out by `views`. Returns the output to add
        instead. In a last layer run for an encoder component's `last_layer_rows` only, the
        output holds those final rows only (B, rows, Dv)."""
        return attention_output

    def start_from_base_projector(self, projector: nn.Module) -> bool:
        """Projector stage: called at assembly with the base's trained projector (llava-hf's
        `multi_modal_projector`, loaded from the base) unless the recipe sets
        `reinit_projector`. Take what fits from it and return True, or ignore it (the default)."""
        return False

    def attach(self, host) -> None:
        """Called once the model is assembled, with the `VtcLlava` that holds this component;
        kept as `self.host` (not a submodule: the host holds this component). An override that
        reads the host calls this first."""
        object.__setattr__(self, "host", host)

    # in_llm stage
    attention_layers: tuple[int, ...] = ()  # layers whose attention probabilities this component reads

    def attention_queries(self, layer_idx: int, state) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows (B, Q) long and their validity (B, Q) bool whose attention this
        component reads at `layer_idx` (one of `attention_layers`); the LLM computes only those
        rows. Default: each sample's last prompt token."""
        rows = state.last_prompt_index()[:, None]
        return rows, torch.ones_like(rows, dtype=torch.bool)

    def read_attention(self, state):
        """This component's `AttentionRows` of the layer just run, or None."""
        return (state.attention or {}).get(id(self))

    def before_layer(self, layer_idx: int, state):
        raise NotImplementedError

    @classmethod
    def check_config(cls, config, dims: ModelDims) -> list[tuple[str, str]]:
        """(key, message) problems of `config` on a model of `dims`, for recipe validation."""
        return []

    # training-free baselines: the name `vtc evaluate --baselines` and `eval.baselines` know it
    # by (None: not a baseline), and the parameters that hit a visual-token budget
    baseline: ClassVar[str | None] = None

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        """Config parameters that make this component keep `budget` of the `visual` tokens per
        image on a model of `dims`, as its own paper counts them (FastV: after its layer;
        PyramidDrop: on average over the layers), or None when it cannot hit the budget."""
        return None


class TokenBudget(Compressor):
    """A pruner whose Config has `tokens`: the number of visual tokens it keeps per image."""

    @classmethod
    def check_config(cls, config, dims: ModelDims) -> list[tuple[str, str]]:
        return [] if config.tokens >= 1 else [("tokens", f"must be ≥ 1, got {config.tokens}")]

    def output_tokens(self, input_tokens: int) -> int:
        return min(self.config.tokens, input_tokens)

    @classmethod
    def budget_params(cls, budget: int, visual: int, dims: ModelDims) -> dict | None:
        return {"tokens": budget}
