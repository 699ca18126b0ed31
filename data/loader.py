"""A training loader that can say where it is in the data stream and continue from there.

The order of samples is a pure function of (seed, epoch): each epoch is a fresh permutation of
the whole dataset, cut into equal interleaved shares, one per rank. The loader counts the batches
it has handed out; `state_dict()` is that position, and `load_state_dict()` makes the next
iteration start right after it. A run killed mid-epoch and resumed therefore sees exactly the
samples an uninterrupted run would have seen, none twice and none skipped.

`state_dict`/`load_state_dict` is the protocol Lightning's fit loop uses for stateful training
loaders (it stores the state in its checkpoint), but nothing here depends on Lightning.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch, in a shuffled order fixed by (seed, epoch).

    Every rank gets `len(dataset) // world` indices (the tail that would make ranks uneven is
    dropped, as DistributedSampler(drop_last=True) does), rank r taking positions r, r+world, ...
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0
        self.skip = 0  # indices to leave out at the start of the next iteration (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        permutation = torch.randperm(self.size, generator=generator)[: len(self) * self.world]
        return permutation[self.rank :: self.world].tolist()

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.size // self.world


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochSampler (drop_last batches) that knows its position."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, **kwargs):
        sampler = EpochSampler(len(dataset), seed, rank, world)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.batches_taken = 0  # in the current epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches taken) to go on from

    def __iter__(self):
        epoch, taken = self._resume or (self.sampler.epoch, 0)
        self._resume = None
        # A position saved at an epoch's last batch is the start of the next epoch, and a
        # trainer may set the sampler there before iterating (Lightning does): the saved
        # position belongs to the epoch it was taken in, and only resumes that one.
        taken = taken if self.sampler.epoch == epoch else 0
        self.batches_taken = taken
        self.sampler.skip = taken * self.batch_size
        for batch in super().__iter__():
            self.batches_taken += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["batches_taken"])
