"""What a training stage minimises, chosen by name in the recipe (`stages[i].objective`).

An objective turns a batch into named loss terms; the stage minimises their weighted sum
(`stages[i].loss_weights`, 1.0 for every term not named) and logs each term as `train/<term>`.

- `lm`:     next-token loss on the answer tokens (LLaVA's objective)
- `region`: per-patch classification of the synthetic scene (dense vision pretraining)
- `aux`:    only the components' own losses (`Compressor.aux_losses`): the LLM may be frozen and
            no next-token loss is computed, so nothing flows back from the LM head
- `lm+aux`: both

Adding one: an `Objective` in `OBJECTIVES` with a `terms(model, batch, region_head)` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.compressors import component_class


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    terms: Callable[..., dict[str, torch.Tensor]]  # (model, batch, region_head) → {term: scalar}
    lm: bool = False  # has the next-token term `lm`
    aux: bool = False  # has the components' own losses
    region_targets: bool = False  # batches carry per-patch scene targets (synthetic data only)


def _model_terms(lm: bool, aux: bool):
    def terms(model, batch, region_head=None) -> dict[str, torch.Tensor]:
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            image_grids=batch.get("image_grids"),
            lm_loss=lm,
        )
        found = {"lm": out.loss} if lm else {}
        if aux:
            found |= out.aux_losses
        found |= out.metrics  # the components' own figures, logged, never minimised
        found["visual_tokens"] = out.visual_tokens_in.float().mean().detach()  # logged, not minimised
        return found

    return terms


def _region_terms(model, batch, region_head) -> dict[str, torch.Tensor]:
    patches = model.vision(batch["pixel_values"]).selected
    loss, accuracy = region_head.loss(patches, batch["region_targets"])
    return {"region": loss, "region_acc": accuracy.mean().detach()}


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("lm", "next-token loss on the answers", _model_terms(True, False), lm=True),
        Objective("region", "per-patch scene classes (synthetic data)", _region_terms, region_targets=True),
        Objective("aux", "the components' own losses only", _model_terms(False, True), aux=True),
        Objective(
            "lm+aux",
            "next-token loss and the components' losses",
            _model_terms(True, True),
            lm=True,
            aux=True,
        ),
    )
}
LOGGED_ONLY = ("visual_tokens", "region_acc")  # terms that are reported, never minimised


def declared_aux_losses(component_names: list[str]) -> dict[str, str]:
    """{loss name: component name} for every loss the named components declare."""
    return {loss: name for name in component_names for loss in component_class(name).aux_losses}


def loss_terms(objective: Objective, component_names: list[str]) -> list[str]:
    """The names of the terms `objective` minimises on a model with these components."""
    terms = ["lm"] if objective.lm else []
    terms += ["region"] if objective.region_targets else []
    return terms + (list(declared_aux_losses(component_names)) if objective.aux else [])


def weighted_total(
    terms: dict[str, torch.Tensor], weights: dict[str, float], minimised: list[str] | None = None
) -> torch.Tensor:
    """Σ weight × term over the minimised terms (weight 1.0 unless the recipe names it):
    `minimised` names them (the stage's `loss_terms`), else every term but LOGGED_ONLY ones."""
    wanted = (
        (lambda name: name in minimised) if minimised is not None else (lambda name: name not in LOGGED_ONLY)
    )
    minimised = [weights.get(name, 1.0) * value for name, value in terms.items() if wanted(name)]
    if not minimised:
        raise RuntimeError("the objective produced no loss term in this step")
    return torch.stack([t.float() for t in minimised]).sum()
