"""Data for a stage: synthetic shards (generated once into the cache) or converted shards,
wrapped in a DataModule whose resumable loader shards them across DDP ranks."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function

from data.dataset import ConversationDataset, collate
from data.errors import UserError
from data.loader import ResumableLoader
from data.shards import ShardIndex
from data.synth import ASKED, OBJECTS, VERSION, write_synthetic
from data.templates import Template
from train.objectives import OBJECTIVES
from train.recipe import DataRecipe, Stage
from train.signals import STOP_SIGNALS


def synthetic_shards(data: DataRecipe, split: str) -> Path:
    """Folder of the synthetic split's shards, generated on first use. Written to a temporary
    folder and renamed into place, so a crash or a second process never leaves half a split."""
    syn = data.synthetic
    count = {"train": syn.train, "val": syn.val, "test": syn.test}[split]
    root = Path(data.cache_dir).absolute()  # a relative cache is from the working directory
    # the default crowd and questions keep the cache's old folder name; others get folders of their own
    crowd = "" if tuple(syn.objects) == OBJECTS else f"-o{syn.objects[0]}-{syn.objects[1]}"
    asked = "" if set(syn.families) == set(ASKED) else "-q" + "+".join(sorted(set(syn.families)))
    name = f"synth-v{VERSION}-s{syn.seed}-{syn.image_size}px-g{syn.grid}{crowd}{asked}"
    target = root / name / f"{split}-{count}"
    if not target.is_dir():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=target.parent))
        except OSError as err:  # e.g. a read-only shared cache that lacks this split
            raise UserError(
                f"data.cache_dir {root}: cannot write the synthetic {split} split there ({err.strerror}); "
                "give data.cache_dir=PATH"
            ) from None
        show = os.environ.get("LOCAL_RANK", "0") == "0"
        try:
            write_synthetic(
                tmp,
                split,
                count,
                syn.seed,
                syn.image_size,
                syn.grid,
                progress=show,
                objects=tuple(syn.objects),
                families=tuple(syn.families),
            )
        except BaseException:  # interrupted (Ctrl-C, a full disk): leave no half split behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def split_shards(data: DataRecipe, split: str) -> ShardIndex:
    if (
        data.synthetic is not None
        and not (split == "train" and data.train_shards)
        and not (split == "test" and data.test_shards)
    ):
        return ShardIndex(synthetic_shards(data, split))
    return ShardIndex(data.train_shards if split == "train" else data.test_shards)


def init_worker(worker_id: int, rank: int) -> None:
    """A loader worker leaves the stop signals (SIGTERM, SLURM's SIGUSR1) to the training
    process, which saves a checkpoint before it stops: a scheduler signals every process of a
    job, and a worker that died of one would end the run with a DataLoader error first. Then
    Lightning's seeding of the worker, which Lightning adds itself only to a loader without a
    `worker_init_fn`."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    pl_worker_init_function(worker_id, rank=rank)


class VtcDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: DataRecipe,
        stage: Stage,
        tokenizer,
        image_size: int,
        image_token_id: int,
        visual_tokens,
        patch_grid: int,
        seed: int,
        templates: list[Template],
        tiling=None,
    ):
        """`templates`: what the stage's samples are encoded with (train.recipe.stage_templates):
        every sample once per template."""
        super().__init__()
        self.data, self.stage, self.seed = data, stage, seed
        self.shards = shards = split_shards(data, "train")
        regions = patch_grid if OBJECTIVES[stage.objective].region_targets else None
        parts = [
            ConversationDataset(
                shards,
                tokenizer,
                t,
                image_size,
                image_token_id,
                data.max_length,
                visual_tokens,
                with_regions=regions,
                tiling=tiling,
                turns=data.turns,
            )
            for t in templates
        ]
        self.dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        self.pad_token_id = tokenizer.pad_token_id

    def train_dataloader(self):
        # vtc shards the data across ranks itself (Trainer(use_distributed_sampler=False)): the
        # loader's order is a function of (seed, epoch, rank) and its position resumes exactly.
        return ResumableLoader(
            self.dataset,
            self.stage.batch_size,
            self.seed,
            rank=self.trainer.global_rank,
            world=self.trainer.world_size,
            # only seeds workers (the data has no randomness); kept off the global RNG stream
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.data.num_workers,
            persistent_workers=self.data.num_workers > 0,
            worker_init_fn=partial(init_worker, rank=self.trainer.global_rank),
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
        )
