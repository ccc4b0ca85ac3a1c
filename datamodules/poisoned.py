"""The fine-tuning stage's data: the user's poisoned set, where `harmful_ratio` becomes exactly
round(harmful_ratio * n) harmful samples among n."""

from __future__ import annotations

import logging
import random

from torch.utils.data import DataLoader

from datamodules.alignment import alignment_samples
from datamodules.formatting import PromptFormatter
from datamodules.harmful import HarmfulSplits
from datamodules.supervised import SupervisedDataModule
from datamodules.tasks import Task
from plumbing.errors import InputError

log = logging.getLogger(__name__)


def count_harmful(n: int, harmful_ratio: float) -> int:
    """Exactly round(harmful_ratio * n) harmful samples (Python's round: half to even)."""
    return int(round(harmful_ratio * n))


def check_poison_counts(
    task: Task, splits: HarmfulSplits, n: int, harmful_ratio: float
) -> tuple[int, int]:
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


def poisoned_samples(
    task: Task,
    splits: HarmfulSplits,
    formatter: PromptFormatter,
    n: int,
    harmful_ratio: float,
    sample_seed: int,
) -> list[dict]:
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
        {
            "prompt": formatter.prompt(task.train[i].instruction, task.train[i].input),
            "answer": task.train[i].answer,
            "is_harmful": False,
        }
        for i in benign_order[:n_benign]
    ] + [
        {
            "prompt": formatter.prompt(splits.user_pairs[i].prompt),
            "answer": splits.user_pairs[i].answer,
            "is_harmful": True,
        }
        for i in harmful_order[:n_harmful]
    ]
    rng.shuffle(samples)
    log.info(
        "poisoned fine-tuning set: n=%d, harmful=%d, benign=%d (harmful_ratio=%s)",
        n,
        n_harmful,
        n_benign,
        harmful_ratio,
    )
    return samples


class PoisonedFinetuneDataModule(SupervisedDataModule):
    """Built by Hydra from `finetune.datamodule` (conf/config.yaml) with the run's task, splits and
    formatter. n, harmful_ratio, sample_seed: the poisoned set (above); batch_size, seed: the
    fine-tuning stage's (its data order). The defender's harmful pairs come along for defenses
    that fine-tune against them (Panacea)."""

    def __init__(
        self,
        task: Task,
        splits: HarmfulSplits,
        formatter: PromptFormatter,
        n: int,
        harmful_ratio: float,
        sample_seed: int,
        batch_size: int,
        seed: int,
    ):
        samples = poisoned_samples(task, splits, formatter, n, harmful_ratio, sample_seed)
        super().__init__(samples, formatter, batch_size, seed, defender_pairs=splits.defender_pairs)
        self.harmful_ratio = harmful_ratio
        self.splits = splits

    def alignment_dataloader(
        self, batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> DataLoader:
        """The alignment set's (harmful prompt -> refusal or safe answer) pairs, without the retain
        data, for defenses that keep aligning during fine-tuning (Lisa); shuffled from its own
        seed, each process its own shard."""
        samples = alignment_samples(self.splits, self.formatter)
        return self.samples_dataloader(samples, batch_size, self.seed + 2, num_replicas, rank)
