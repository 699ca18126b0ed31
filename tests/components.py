"""Simple components for testing the hook points (registered only by the tests that import them)."""

from dataclasses import dataclass, replace

import torch
from torch import nn

from models.compressors import register
from models.compressors.base import Compressor
from models.gather import gathered


@dataclass(frozen=True)
class RegistersConfig:
    count: int = 4


@register("test_registers")
class TestRegisters(Compressor):
    """Encoder stage: append `count` learned tokens to the ViT input, keep only their outputs."""

    stage = "encoder"
    Config = RegistersConfig

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.registers = nn.Parameter(torch.randn(1, config.count, dims.vision_width) * 0.02)

    def output_tokens(self, input_tokens):
        return self.config.count

    def extend_embeddings(self, embeddings, views):
        return torch.cat(
            [embeddings, self.registers.expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)], 1
        )

    def select(self, hidden_states, num_patches, views):
        return hidden_states[-2][:, -self.config.count :]


def keep_first_visual(state, keep: int):
    """Each sample's first `keep` visual tokens and all its text."""
    rank = torch.cumsum(state.visual_mask.long(), 1)
    return state.keep(~state.visual_mask | (rank <= keep))


@dataclass(frozen=True)
class KeepFirstConfig:
    keep: int = 5


@register("test_keep_first")
class TestKeepFirst(Compressor):
    """Pre-LLM stage: keep the first `keep` visual tokens of each sample."""

    stage = "pre_llm"
    Config = KeepFirstConfig

    def output_tokens(self, input_tokens):
        return min(self.config.keep, input_tokens)

    def forward(self, state):
        return keep_first_visual(state, self.config.keep)


@dataclass(frozen=True)
class DropAtConfig:
    layer: int = 1


@register("test_drop_visual_at")
class TestDropVisualAt(Compressor):
    """In-LLM stage: before decoder layer `layer`, remove every visual token."""

    stage = "in_llm"
    Config = DropAtConfig

    def before_layer(self, layer_idx, state):
        if layer_idx != self.config.layer or not bool(state.visual_mask.any()):
            return state
        return state.keep(~state.visual_mask)


@dataclass(frozen=True)
class ScorerConfig:
    keep: int = 4


@register("test_scorer")
class TestScorer(Compressor):
    """Pre-LLM stage with its own loss: a linear scorer keeps the `keep` best-scored visual tokens
    and learns to predict each token's mean activation (`scorer_mse`), as a pruning module that
    trains from a frozen LLM's signal would."""

    stage = "pre_llm"
    Config = ScorerConfig
    aux_losses = ("scorer_mse",)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.score = nn.Linear(dims.llm_width, 1)

    def output_tokens(self, input_tokens):
        return min(self.config.keep, input_tokens)

    def forward(self, state):
        scores = self.score(state.hidden).squeeze(-1)  # (B, T)
        visual = state.visual_mask & state.attention_mask
        target = state.hidden.detach().mean(-1)
        self.add_loss("scorer_mse", ((scores - target)[visual] ** 2).mean())
        return state.keep_top_visual(scores.detach(), self.config.keep)


CRASH_AT_STEP: list[int] = []  # a test sets a step here to simulate a crash before it


@dataclass(frozen=True)
class ScheduledConfig:
    start: int = 16  # visual tokens kept at the start of the stage
    end: int = 4  # ... and at its end (linear in the stage's progress); `end` outside training


@register("test_scheduled_keep")
class TestScheduledKeep(Compressor):
    """Pre-LLM stage on a schedule: keep the first k visual tokens, k going linearly from
    `start` to `end` over the stage, scaled by a learned gain (so that there is a weight to
    train and to compare after a resume)."""

    stage = "pre_llm"
    Config = ScheduledConfig

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.gain = nn.Parameter(torch.ones(()))

    def current_keep(self) -> int:
        if self.progress is None:
            return self.config.end
        return round(self.config.start + (self.config.end - self.config.start) * self.progress.fraction)

    def set_progress(self, progress):
        super().set_progress(progress)
        if progress is not None and progress.step in CRASH_AT_STEP:
            raise RuntimeError(f"simulated crash before step {progress.step}")
        return {"keep": float(self.current_keep())}

    def output_tokens(self, input_tokens):
        return min(self.config.end, input_tokens)

    def forward(self, state):
        state = keep_first_visual(state, self.current_keep())
        hidden = torch.where(state.visual_mask[..., None], state.hidden * self.gain, state.hidden)
        return replace(state, hidden=hidden)


@register("test_hide_visual_at")
class TestHideVisualAt(Compressor):
    """In-LLM stage: from decoder layer `layer` on, no token attends to the visual tokens (they
    stay in the sequence), as a visual-token exit does."""

    stage = "in_llm"
    Config = DropAtConfig

    def before_layer(self, layer_idx, state):
        if layer_idx != self.config.layer or not bool(state.visual_mask.any()):
            return state
        return state.hide_visual_keys()


@register("test_attention_gain")
class TestAttentionGain(Compressor):
    """Inside every vision-encoder layer: scale the self-attention output by a learned per-layer
    gain (1 at start: the tower is unchanged). On attach, a copy of layer 0's query projection
    (as a method that starts from the host's attention would)."""

    stage = "pre_llm"
    acts_in_vision_layers = True

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.gain = nn.Parameter(torch.ones(dims.vision_layers))
        self.query = nn.Linear(dims.vision_width, dims.vision_width)

    def attach(self, host):
        super().attach(host)
        source = host.vision.layers()[0].self_attn.q_proj
        with gathered(list(source.parameters()), modify=False), torch.no_grad():
            self.query.weight.copy_(source.weight)
            self.query.bias.copy_(source.bias)

    def after_vision_attention(self, layer_idx, layer_input, attention_output, views):
        return attention_output * self.gain[layer_idx]

    def forward(self, state):
        return state


@register("test_alternating_gates")
class TestAlternatingGates(Compressor):
    """Pre-LLM stage with two gates on the visual tokens, of which only one is used (and learns)
    per training step, by step parity: parameters without a gradient in a step, as per-layer
    routers have."""

    stage = "pre_llm"
    sparse_gradients = True

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.gates = nn.ParameterList([nn.Parameter(torch.ones(())) for _ in range(2)])

    def forward(self, state):
        gate = self.gates[self.progress.step % 2 if self.progress is not None else 0]
        hidden = torch.where(state.visual_mask[..., None], state.hidden * gate, state.hidden)
        return replace(state, hidden=hidden)


@register("test_view_registers")
class TestViewRegisters(Compressor):
    """Encoder stage that uses the views' layout: one register per view, embedded by where the
    view sits in its image (whole image / thumbnail, or crop row and column); inside every
    encoder layer the registers of one image's views exchange their mean (as FALCON's ReAtten
    lets sub-images talk). Emits the view's patches and its register."""

    stage = "encoder"
    MAX_CROPS = 4  # per side

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.position = nn.Embedding(1 + self.MAX_CROPS**2, dims.vision_width)
        self.mix = nn.Parameter(torch.ones(()))
        self.seen = []  # the layouts `select` got, for the test to read

    def output_tokens(self, input_tokens):
        return input_tokens + 1

    def extend_embeddings(self, embeddings, views):
        slot = torch.where(views.is_crop, 1 + views.row * self.MAX_CROPS + views.col, 0)
        return torch.cat([embeddings, self.position(slot)[:, None].to(embeddings.dtype)], 1)

    acts_in_vision_layers = True

    def after_vision_attention(self, layer_idx, layer_input, attention_output, views):
        register = attention_output[:, -1]  # (V, Dv)
        images = int(views.image.max()) + 1
        total = register.new_zeros(images, register.shape[-1]).index_add(0, views.image, register)
        mean = total / torch.bincount(views.image, minlength=images)[:, None].to(register.dtype)
        shared = torch.zeros_like(attention_output)
        shared[:, -1] = self.mix * mean[views.image]
        return attention_output + shared

    def select(self, hidden_states, num_patches, views):
        self.seen.append(views)
        prefix = self.dims.prefix_tokens
        return hidden_states[-2][:, prefix:]  # the patches and the register
