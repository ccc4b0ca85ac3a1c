"""A training DataLoader that a checkpoint can stop in the middle of an epoch and resume exactly.

Lightning saves the `state_dict()` of a dataloader that has one with every checkpoint, and on
resume hands it back through `load_state_dict` before it asks for the iterator. The state is how
many passes over the data were started and how many batches the latest one yielded. Resuming
replays those passes through the plain DataLoader and throws their batches away. The shuffles
therefore come out exactly as in the uninterrupted run whatever the loader draws its
randomness from: its own generator (one process) or, under DDP, the global RNG for the base
seed. The global RNG is forked during the replay, so the module's restored RNG state stays as
it was saved. Replaying costs the collation of the skipped batches, not a model pass.

The class is a DataLoader, so Lightning can still swap in a DistributedSampler under DDP.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes_started = 0
        self.batches_yielded = 0  # by the latest pass
        self._resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        return {"passes_started": self.passes_started, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["passes_started"], state["batches_yielded"])

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for, which is after Lightning
        # has set the sampler's epoch, exactly as the plain DataLoader draws its shuffle.
        passes, skip = self._resume_at or (0, 0)
        self._resume_at = None
        if skip >= len(self):  # the checkpoint closed a pass: the next one starts fresh
            passes, skip = passes + 1, 0
        with torch.random.fork_rng():
            for _ in range(passes - 1):  # the finished passes
                self._pass(skip=len(self))
        # a pass under way had drawn its shuffle and base seed before the save: not again
        with torch.random.fork_rng() if skip else nullcontext():
            batches = self._pass(skip)
        for batch in batches:
            self.batches_yielded += 1
            yield batch

    def _pass(self, skip: int):
        """A new pass's iterator, its first `skip` batches taken. A finished pass is replayed with
        skip = len(self), exactly the batches the trainer takes: exhausting the iterator instead
        would run RandomSampler's epilogue, which draws one more permutation from the generator
        when the last batch is full (the trainer never asks past the last batch)."""
        self.passes_started += 1
        self.batches_yielded = skip
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        return batches
