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
        skip = 0
        if self._resume_at is not None:
            passes, skip = self._resume_at
            self._resume_at = None
            with torch.random.fork_rng():
                for _ in range(passes - 1):  # the finished passes
                    self._replayed_pass()
            if skip >= len(self):  # the checkpoint closed a pass: the next one starts fresh
                with torch.random.fork_rng():
                    self._replayed_pass()
                skip = 0
        self.passes_started += 1
        self.batches_yielded = skip
        if skip:  # the pass was under way: its shuffle and base seed were drawn before the save
            with torch.random.fork_rng():
                batches = super().__iter__()
                for _ in range(skip):
                    next(batches)
        else:
            batches = super().__iter__()
        for batch in batches:
            self.batches_yielded += 1
            yield batch

    def _replayed_pass(self) -> None:
        """Exactly len(self) batches, as the trainer takes them: exhausting the iterator instead
        would run RandomSampler's epilogue, which draws one more permutation from the generator
        when the last batch is full (the trainer never asks past the last batch)."""
        self.passes_started += 1
        batches = super().__iter__()
        for _ in range(len(self)):
            next(batches)
