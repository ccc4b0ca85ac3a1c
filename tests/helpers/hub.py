"""The papers' hub datasets offline: small files in each dataset's schema (tests/fixtures/hub) and
loaders that read them."""

import json

from datamodules.harmful import beavertails_splits
from helpers.configs import ROOT

HUB = ROOT / "tests" / "fixtures" / "hub"


def beavertails(**sizes):
    """BeaverTails' roles from the fixture files; `sizes` overrides any data setting."""
    data = {
        "hub_name": "PKU-Alignment/BeaverTails",
        "train_split": "30k_train",
        "test_split": "30k_test",
        "train_path": str(HUB / "beavertails_30k_train.jsonl"),
        "test_path": str(HUB / "beavertails_30k_test.jsonl"),
        "n_align": 10,
        "n_defender": 5,
        "n_eval": 8,
        "split_seed": 0,
        **sizes,
    }
    return beavertails_splits(data)


def rows(name):
    """The rows of a fixture file."""
    return [json.loads(line) for line in (HUB / name).read_text().splitlines()]


def task(cls, stem, test_split="test", n_test=3):
    """A hub task read from the fixture files `<stem>_train.jsonl` and `<stem>_<test_split>.jsonl`."""
    return cls(
        n_train=100,
        n_test=n_test,
        train_path=str(HUB / f"{stem}_train.jsonl"),
        test_path=str(HUB / f"{stem}_{test_split}.jsonl"),
    )


def alpaca():
    """The tiny tokenizer's formatter with the papers' Alpaca template."""
    from datamodules.formatting import PromptFormatter
    from plumbing.models import load_tiny_tokenizer

    return PromptFormatter(load_tiny_tokenizer(), "alpaca", max_length=256)
