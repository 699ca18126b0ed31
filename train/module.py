"""The LightningModule: a thin adapter that turns a batch into the stage objective's loss and
builds the optimizer/scheduler from the stage recipe. All model logic lives in `models/`."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from data.errors import UserError
from models.build import floating_buffers, restore_buffers
from models.compressors.base import Progress
from models.llava import VtcLlava
from models.region_head import RegionHead
from train.checkpoint import restore_rng, rng_state
from train.objectives import OBJECTIVES, loss_terms, weighted_total
from train.outputs import write_text_atomic
from train.precision import MasterWeightsAdamW, needs_master_weights
from train.recipe import Stage
from train.zero import load_state, trainable_state

NONFINITE_RUN = 10  # with nonfinite_loss: skip, this many non-finite losses in a row stop the run


class VtcModule(L.LightningModule):
    def __init__(
        self,
        model: VtcLlava,
        stage: Stage,
        total_steps: int,
        region_head: RegionHead | None = None,
        run_dir: Path | None = None,
        record_samples: bool = False,
        saved_weights: set[str] = frozenset(),
        nonfinite_loss: str = "stop",
    ):
        super().__init__()
        # Checkpoints hold only `saved_weights` (names in the model: everything any stage so far
        # trained) and the region head; frozen weights come back from the base, hence not strict.
        self.saved_weights = set(saved_weights)
        self.strict_loading = False
        self.nonfinite_loss = nonfinite_loss
        self.nonfinite_skipped: list[int] = []
        self.nonfinite_streak = 0  # non-finite losses (micro-batches) since the last finite one
        self.model = model
        self.stage = stage
        self.objective = OBJECTIVES[stage.objective]
        names = [getattr(c, "registry_name", type(c).__name__) for c in model.components()]
        self.terms = tuple(loss_terms(self.objective, names))
        self.total_steps = total_steps
        self.region_head = region_head
        self.run_dir = run_dir
        self.record_samples = record_samples
        self.skipped: dict[str, str] = {}
        self.seen_ids: list[str] = []

    def on_fit_start(self) -> None:
        # Models loaded with from_pretrained start in eval mode, and Lightning leaves the mode
        # as it finds it: without this, dropout (LoRA's included) would be off while training.
        self.train()

    def to(self, *args, **kwargs):
        """`module.to(...)` that keeps the floating buffers' precision, as `from_pretrained` and
        DeepSpeed keep them: Lightning's `bf16-true` casts the whole module with `.to(dtype)`
        before DDP or DeepSpeed wrap it, and a rotary inv_freq in bfloat16 would put a Llama's
        positions out by radians (`bench/half_precision.py`). Kept here, before the wrap, DDP
        records and broadcasts the buffers the model reads."""
        kept = floating_buffers(self.model)
        moved = super().to(*args, **kwargs)
        restore_buffers(self.model, kept)
        return moved

    def stage_progress(self, step: int) -> Progress:
        """Where this stage stands at optimizer step `step`, as its components see it."""
        return Progress(step, self.total_steps, self.terms, self.stage.components)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # From the global step, which a resumed run restores: schedules continue exactly.
        states = self.model.set_progress(self.stage_progress(self.global_step))
        for name, value in states.items():
            self.log(f"schedule/{name}", float(value))

    def on_train_end(self) -> None:
        self.model.set_progress(None)  # back to the components' inference settings
        self._write_records()

    def training_step(self, batch, batch_idx):
        for sample_id, reason in batch["skipped"]:
            self.skipped[sample_id] = reason
        if self.record_samples:
            self.seen_ids.extend(batch["ids"])
        if "input_ids" not in batch:  # every sample skipped: a zero loss keeps DDP ranks in step
            self._stop_with_the_other_ranks(nonfinite_here=False)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        terms = self.objective.terms(self.model, batch, self.region_head)
        loss = weighted_total(terms, self.stage.loss_weights, list(self.terms))
        if not loss.requires_grad:  # caught by check_recipe where the recipe shows it; this is the rest
            raise UserError(
                f"stage {self.stage.name!r}: objective {self.stage.objective!r} reaches no trainable "
                "weight (its terms do not depend on what this stage trains)"
            )
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach().float(), prog_bar=name in ("region_acc",))
        nonfinite = not torch.isfinite(loss)
        self._stop_with_the_other_ranks(nonfinite)
        if nonfinite:
            # None: Lightning runs no backward, so no weight moves (the step number and the LR
            # schedule still advance)
            if self.nonfinite_loss == "skip":
                self.nonfinite_skipped.append(self.global_step)
                print(f"[vtc] non-finite loss at step {self.global_step}: batch skipped", flush=True)
                self.nonfinite_streak += 1
                if self.nonfinite_streak >= NONFINITE_RUN:
                    # skipping exists for the odd bad batch; a run of them means every batch is
                    # bad (the weights or the data), and training on would only burn time
                    raise UserError(
                        f"{NONFINITE_RUN} non-finite losses in a row (up to step {self.global_step} "
                        f"of stage {self.stage.name!r}): stopped; no weight moved on them, so the "
                        "last checkpoint is the last good one. Lower the stage's optim.lr, or check "
                        "the data"
                    )
                return None
            raise UserError(  # usually the recipe's doing (a learning rate too high): one line, exit 2
                f"non-finite loss {loss.item()} at step {self.global_step} of stage "
                f"{self.stage.name!r}; stopped before it reached the weights (the last checkpoint "
                "is the last good one): lower the stage's optim.lr, or set trainer.nonfinite_loss: skip"
            )
        self.nonfinite_streak = 0
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/skipped", float(len(self.skipped)))
        return loss

    def _stop_with_the_other_ranks(self, nonfinite_here: bool) -> None:
        """Every micro-batch, the ranks learn together whether any of them met a non-finite loss,
        and then all stop (a rank that stopped alone left the others in the gradient all-reduce:
        over gloo they died of the closed connection, over NCCL they would wait for the process
        group's timeout). One all-reduce of a flag; nothing on a single device."""
        if self.trainer.world_size == 1:
            return
        anywhere = self.trainer.strategy.reduce_boolean_decision(nonfinite_here, all=False)
        if not anywhere or nonfinite_here:  # this rank's own non-finite loss is said below
            return
        raise UserError(
            f"another process of this run met a non-finite loss at step {self.global_step} of "
            f"stage {self.stage.name!r}; stopping too"
        )

    def configure_optimizers(self):
        optim = self.stage.optim
        params = [p for p in self.parameters() if p.requires_grad]
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        master = needs_master_weights(params, str(self.trainer.precision), deepspeed)
        adamw = MasterWeightsAdamW if master else torch.optim.AdamW
        optimizer = adamw(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
        factor = warmup_schedule(self.total_steps, optim.warmup, optim.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self._saved(k)}
        checkpoint["vtc"] = {
            "rng": rng_state(),  # ranks share one seed and consume the RNG alike
            "skipped_by_rank": gather_from_ranks(dict(self.skipped)),
            "nonfinite_skipped": list(self.nonfinite_skipped),
        }
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed's shards hold the weights this stage trains only (exclude_frozen_parameters,
            # and Lightning drops the state_dict): those an earlier stage trained travel here.
            checkpoint["vtc"]["trained_before"] = trainable_state(self.model, self._trained_before())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Under DeepSpeed the engine has restored the weights from its own shards, and Lightning
        # hands over the rest of the checkpoint without a state_dict.
        unknown = sorted(set(checkpoint.get("state_dict", {})) - set(self.state_dict()))
        if unknown:  # not strict about missing (frozen) weights, but never ignore a saved one
            raise ValueError(f"checkpoint has {len(unknown)} weight(s) this model lacks, e.g. {unknown[:3]}")
        state = checkpoint["vtc"]
        restore_rng(state["rng"])
        by_rank = state["skipped_by_rank"]
        self.skipped = dict(by_rank[self.global_rank]) if self.global_rank < len(by_rank) else {}
        self.nonfinite_skipped = list(state["nonfinite_skipped"])
        if state.get("trained_before"):  # a DeepSpeed checkpoint of a later stage
            load_state(self.model, state["trained_before"])

    def _trained_before(self) -> set[str]:
        """Parameters an earlier stage trained (or `model.init` set) that this stage keeps frozen."""
        return {
            n for n, p in self.model.named_parameters() if n in self.saved_weights and not p.requires_grad
        }

    def _saved(self, key: str) -> bool:
        if key.startswith("region_head."):
            return True
        return key.startswith("model.") and key[len("model.") :] in self.saved_weights

    def _write_records(self) -> None:
        if self.run_dir is None:
            return
        rank = self.global_rank
        if self.skipped:
            path = self.run_dir / f"skipped-{self.stage.name}-rank{rank}.jsonl"
            write_text_atomic(
                path, "".join(json.dumps({"id": i, "reason": r}) + "\n" for i, r in self.skipped.items())
            )
            print(
                f"[vtc] stage {self.stage.name!r} rank {rank}: skipped {len(self.skipped)} sample(s), listed in {path}"
            )
        if self.record_samples:
            record = {"rank": rank, "seen_ids": self.seen_ids, "weights_sha256": trainable_digest(self.model)}
            (self.run_dir / f"record-{self.stage.name}-rank{rank}.json").write_text(json.dumps(record))


def warmup_schedule(total_steps: int, warmup_fraction: float, schedule: str = "cosine"):
    """LR factor per step: linear warm-up over `warmup_fraction` of the steps (at least one),
    then constant or cosine to zero."""
    warmup = max(1, math.ceil(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def gather_from_ranks(value) -> list:
    """Every rank's `value`, in rank order (all ranks must call it; [value] when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def trainable_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the bytes of every trainable parameter, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
