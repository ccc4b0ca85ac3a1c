"""The fine-tuning set with an exact share of harmful samples (datamodules/poisoned.py), directly
and as Hydra builds its datamodule from conf/."""

import pytest
from hydra.utils import instantiate

from datamodules.poisoned import (
    PoisonedFinetuneDataModule,
    check_poison_counts,
    poisoned_samples,
)
from plumbing.errors import InputError


@pytest.mark.parametrize(
    "ratio,expected", [(0, 0), (0.05, 5), (0.1, 10), (0.15, 15), (0.2, 20), (1.0, 100)]
)
def test_exact_harmful_count_per_ratio(task, offline_splits, tiny_formatter, ratio, expected):
    samples = poisoned_samples(task, offline_splits, tiny_formatter, 100, ratio, sample_seed=3)
    assert len(samples) == 100
    assert sum(s["is_harmful"] for s in samples) == expected


def test_benign_subset_nested_across_ratios(task, offline_splits, tiny_formatter):
    def benign(ratio):
        return {
            s["prompt"]
            for s in poisoned_samples(task, offline_splits, tiny_formatter, 100, ratio, 7)
            if not s["is_harmful"]
        }

    b0, b1, b2 = benign(0.0), benign(0.1), benign(0.2)
    assert b2 < b1 < b0 and len(b0) == 100 and len(b2) == 80


def test_sampling_depends_on_sample_seed_only(task, offline_splits, tiny_formatter):
    a = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=1)
    b = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=1)
    c = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=2)
    assert a == b and a != c


def test_too_many_harmful_samples_says_how_many_there_are(task, offline_splits):
    pool = len(offline_splits.user_pairs)
    with pytest.raises(InputError, match=f"needs {pool + 1} harmful samples.*has {pool}"):
        check_poison_counts(task, offline_splits, pool + 1, 1.0)


@pytest.mark.parametrize("ratio,expected", [(0, 0), (0.1, 3), (0.25, 8), (0.5, 15), (1.0, 30)])
def test_harmful_ratio_from_the_command_line_becomes_exact_harmful_count(
    tiny_cfg, task, offline_splits, tiny_formatter, ratio, expected
):
    cfg = tiny_cfg(f"harmful_ratio={ratio}", "finetune.n=30")
    dm = instantiate(cfg.finetune.datamodule)(
        task=task, splits=offline_splits, formatter=tiny_formatter
    )
    assert isinstance(dm, PoisonedFinetuneDataModule) and dm.harmful_ratio == ratio
    assert (
        len(dm.samples) == 30 and sum(s["is_harmful"] for s in dm.samples) == expected
    )  # round(0.25*30)=8
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == cfg.finetune.batch_size
    assert len(dm.defender_items()) == len(offline_splits.defender_pairs)
