"""Shared fixtures: the real config tree composed and shrunk to the tiny model (tests never
touch the network or the default model). Helpers that are not fixtures are in tests/helpers/."""

from __future__ import annotations

import os

import pytest

from helpers.configs import compose_cfg

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: compose_cfg(tmp_path, *overrides)


@pytest.fixture(scope="session")
def tiny_formatter():
    from datamodules.formatting import PromptFormatter
    from plumbing.models import load_tiny_tokenizer

    return PromptFormatter(load_tiny_tokenizer(), "chat", max_length=96)


@pytest.fixture(scope="session")
def offline_splits():
    from datamodules.harmful import build_harmful_splits

    return build_harmful_splits(
        "pkg:pyrit/datasets/jailbreak/many_shot_examples.json",
        [
            {
                "path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "format": "seed_yaml",
            }
        ],
        n_defender=100,
        n_align=200,
        n_eval=40,
        split_seed=0,
    )


@pytest.fixture(scope="module")
def task():
    """The synthetic sentiment task that the data tests draw their benign samples from."""
    from datamodules.tasks import SentimentTask

    return SentimentTask(n_train=300, n_test=50, seed=1234)
