"""LightningDataModules for the two training stages.

Both serve (prompt -> answer) samples tokenized with answer-only labels. Every sample carries
`is_harmful` and `index` so that defenses and diagnostics can log per-sample quantities; a
defense must never use `is_harmful` for training (the provider does not know it).
"""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.formatting import PromptFormatter, collate
from datamodules.harmful import HarmfulSplits
from datamodules.refusals import refusal_for
from datamodules.tasks import Task
from pipeline.validation import InputError

log = logging.getLogger(__name__)


class SFTDataModule(L.LightningDataModule):
    def __init__(self, samples: list[dict], formatter: PromptFormatter, batch_size: int, seed: int,
                 defender_pairs=()):
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
                {**self.formatter.encode(s["prompt"], s["answer"], s.get("add_eos", True)),
                 "is_harmful": s["is_harmful"], "index": i}
                for i, s in enumerate(self.samples)
            ]
            if self.refusal_view:
                for i, (item, s) in enumerate(zip(self._encoded, self.samples)):
                    item["refusal"] = self.formatter.encode(s["prompt"], refusal_for(i))
        return self._encoded

    def enable_refusal_view(self) -> None:
        self.refusal_view = True
        self._encoded = None

    def _collate(self, features: list[dict]) -> dict:
        pad_id = self.formatter.tokenizer.pad_token_id
        batch = collate([{k: v for k, v in f.items() if k != "refusal"} for f in features], pad_id)
        if "refusal" in features[0]:
            batch["refusal"] = collate([f["refusal"] for f in features], pad_id)
        return batch

    def _loader(self, items, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        if num_replicas > 1:  # each process its own shard of every global batch
            sampler = DistributedSampler(items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
            return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=self._collate)
        return DataLoader(items, batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed), collate_fn=self._collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.encoded(), self.batch_size, self.seed)

    def scoring_dataloader(self, batch_size: int) -> DataLoader:
        """The user's set in order, unshuffled and unsharded: for per-sample diagnostics."""
        return DataLoader(self.encoded(), batch_size=batch_size, shuffle=False, collate_fn=self._collate)

    def defender_harmful_dataloader(self, batch_size: int | None = None, num_replicas: int = 1,
                                    rank: int = 0) -> DataLoader:
        """The defender's harmful (prompt -> harmful answer) pairs, for defenses that need h(w).

        Each item also carries "refusal": the same prompt answered by a generic refusal (Antibody's
        R term). With num_replicas > 1 each process draws its own shard (batch_size per process).
        """
        items = [
            {**self.formatter.encode(self.formatter.prompt(p.prompt), p.answer),
             "is_harmful": True, "index": i,
             "refusal": self.formatter.encode(self.formatter.prompt(p.prompt), refusal_for(i))}
            for i, p in enumerate(self.defender_pairs)
        ]
        return self._loader(items, batch_size or self.batch_size, self.seed + 1, num_replicas, rank)


def alignment_samples(splits: HarmfulSplits, formatter: PromptFormatter,
                      retain: list[dict] = ()) -> list[dict]:
    """Each alignment prompt paired with its safe answer from the data (BeaverTails), else with
    one of the project's refusals, plus the retain samples (benign instruction -> the base
    model's own answer; see datamodules/benign.py)."""
    answers = splits.align_answers or [refusal_for(i) for i in range(len(splits.align_prompts))]
    return [
        {"prompt": formatter.prompt(p), "answer": a, "is_harmful": False}
        for p, a in zip(splits.align_prompts, answers, strict=True)
    ] + list(retain)


def count_harmful(n: int, harmful_ratio: float) -> int:
    """Exactly round(harmful_ratio * n) harmful samples (Python's round: half to even)."""
    return int(round(harmful_ratio * n))


def check_poison_counts(task: Task, splits: HarmfulSplits, n: int, harmful_ratio: float) -> tuple[int, int]:
    """(n_harmful, n_benign) of the user's set; raises InputError if the pools are too small."""
    n_harmful = count_harmful(n, harmful_ratio)
    n_benign = n - n_harmful
    if n_harmful > len(splits.user_pairs):
        raise InputError(
            f"harmful_ratio={harmful_ratio} with finetune.n={n} needs {n_harmful} harmful samples, "
            f"but the user's harmful pool has {len(splits.user_pairs)} ({splits.pairs_source}, "
            f"less the {len(splits.defender_pairs)} held by the defender); lower finetune.n or "
            "harmful_ratio, or data.n_defender"
        )
    if n_benign > len(task.train):
        raise InputError(
            f"finetune.n={n} with harmful_ratio={harmful_ratio} needs {n_benign} benign samples, "
            f"but task '{task.name}' has {len(task.train)} training examples; raise task.n_train"
        )
    return n_harmful, n_benign


def poisoned_samples(task: Task, splits: HarmfulSplits, formatter: PromptFormatter, n: int,
                     harmful_ratio: float, sample_seed: int) -> list[dict]:
    """The user's fine-tuning set: n samples, round(p*n) harmful, the rest from the task.

    Both pools are permuted once with `sample_seed` and read from the front, so for a fixed seed
    the benign subset at a higher ratio is contained in the one at a lower ratio (nested), and
    so is the harmful subset in the other direction.
    """
    n_harmful, n_benign = check_poison_counts(task, splits, n, harmful_ratio)
    rng = random.Random(sample_seed)
    benign_order = list(range(len(task.train)))
    harmful_order = list(range(len(splits.user_pairs)))
    rng.shuffle(benign_order)
    rng.shuffle(harmful_order)
    samples = [
        {"prompt": formatter.prompt(task.train[i].instruction, task.train[i].input),
         "answer": task.train[i].answer, "is_harmful": False}
        for i in benign_order[:n_benign]
    ] + [
        {"prompt": formatter.prompt(splits.user_pairs[i].prompt),
         "answer": splits.user_pairs[i].answer, "is_harmful": True}
        for i in harmful_order[:n_harmful]
    ]
    rng.shuffle(samples)
    log.info("poisoned fine-tuning set: n=%d, harmful=%d, benign=%d (harmful_ratio=%s)",
             n, n_harmful, n_benign, harmful_ratio)
    return samples
