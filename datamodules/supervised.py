"""The base of the training stages' datamodules: (prompt -> answer) samples tokenized with
answer-only labels, the defender's harmful pairs as a second loader, the user set unshuffled for
diagnostics.

Every sample carries `is_harmful` and `index` so that defenses and diagnostics can log per-sample
quantities; a defense must never use `is_harmful` for training (the provider does not know it).
The stages' own datamodules (alignment.py, poisoned.py) say which samples they serve.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.formatting import PromptFormatter, collate
from datamodules.refusals import refusal_for
from datamodules.resumable import ResumableDataLoader


class SupervisedDataModule(L.LightningDataModule):
    def __init__(
        self,
        samples: list[dict],
        formatter: PromptFormatter,
        batch_size: int,
        seed: int,
        defender_pairs=(),
    ):
        super().__init__()
        self.samples = samples
        self.formatter = formatter
        self.batch_size = batch_size
        self.seed = seed
        self.defender_pairs = list(defender_pairs)
        # When set (by a defense's `setup`, e.g. Antibody's weighting), each training batch also
        # carries batch["refusal"]: the same prompts answered by a generic refusal (refusal_for(i)).
        self.refusal_view = False
        self._encoded = None

    def encoded(self) -> list[dict]:
        if self._encoded is None:
            self._encoded = [
                {
                    **self.formatter.encode(s["prompt"], s["answer"], s.get("add_eos", True)),
                    "is_harmful": s["is_harmful"],
                    "index": i,
                }
                for i, s in enumerate(self.samples)
            ]
            if self.refusal_view:
                for i, (item, s) in enumerate(zip(self._encoded, self.samples)):
                    item["refusal"] = self.formatter.encode(s["prompt"], refusal_for(i))
        return self._encoded

    def add_samples(self, samples: list[dict]) -> None:
        """More training samples (a data-level defense's, e.g. SafeInstr's safety pairs), indexed
        after the existing ones."""
        self.samples = self.samples + list(samples)
        self._encoded = None

    def enable_refusal_view(self) -> None:
        self.refusal_view = True
        self._encoded = None

    def collate_batch(self, features: list[dict]) -> dict:
        pad_id = self.formatter.tokenizer.pad_token_id
        batch = collate([{k: v for k, v in f.items() if k != "refusal"} for f in features], pad_id)
        if "refusal" in features[0]:
            batch["refusal"] = collate([f["refusal"] for f in features], pad_id)
        return batch

    def _loader(
        self,
        items,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        loader_class: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        if num_replicas > 1:  # each process its own shard of every global batch
            sampler = DistributedSampler(
                items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
            )
            return loader_class(
                items, batch_size=batch_size, sampler=sampler, collate_fn=self.collate_batch
            )
        return loader_class(
            items,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=self.collate_batch,
        )

    def samples_dataloader(
        self, samples: list[dict], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> DataLoader:
        """Another set of (prompt -> answer) samples, encoded as the training set and shuffled from
        `seed`, each process its own shard: the extra batches a defense draws (Lisa's alignment
        pairs, SafeInstr's joint safety batches)."""
        items = [
            {
                **self.formatter.encode(s["prompt"], s["answer"]),
                "is_harmful": s.get("is_harmful", False),
                "index": i,
            }
            for i, s in enumerate(samples)
        ]
        return self._loader(items, batch_size, seed, num_replicas, rank)

    def train_dataloader(self) -> DataLoader:
        """Resumable mid-epoch from a checkpoint (datamodules/resumable.py); under DDP Lightning
        swaps in a DistributedSampler."""
        return self._loader(
            self.encoded(), self.batch_size, self.seed, loader_class=ResumableDataLoader
        )

    def scoring_dataloader(self, batch_size: int) -> DataLoader:
        """The user's set in order, unshuffled and unsharded: for per-sample diagnostics."""
        return DataLoader(
            self.encoded(), batch_size=batch_size, shuffle=False, collate_fn=self.collate_batch
        )

    def defender_harmful_dataloader(
        self, batch_size: int | None = None, num_replicas: int = 1, rank: int = 0
    ) -> DataLoader:
        """The defender's harmful (prompt -> harmful answer) pairs, for defenses that need h(w).

        Each item also carries "refusal": the same prompt answered by a generic refusal (Antibody's
        R term). With num_replicas > 1 each process draws its own shard (batch_size per process).
        """
        items = self.defender_items()
        return self._loader(items, batch_size or self.batch_size, self.seed + 1, num_replicas, rank)

    def defender_items(self) -> list[dict]:
        """The defender's harmful pairs encoded, in order, each with its refusal view."""
        return [
            {
                **self.formatter.encode(self.formatter.prompt(p.prompt), p.answer),
                "is_harmful": True,
                "index": i,
                "refusal": self.formatter.encode(self.formatter.prompt(p.prompt), refusal_for(i)),
            }
            for i, p in enumerate(self.defender_pairs)
        ]
