"""Lisa's tiny setup: the fine-tuning stage's own datamodule (user set and alignment pairs) on
stand-in splits and task, and the module with small K1, K2; shared by its tests and the
two-process tests."""

from functools import partial

import torch

from datamodules.poisoned import PoisonedFinetuneDataModule
from helpers.training import Pair, tiny_lora
from lightning_modules.lisa import LisaModule


class Splits:
    """The parts of HarmfulSplits the poisoned datamodule reads."""

    def __init__(self, n_align=6, n_user=8):
        self.align_prompts = [f"Tell me how to hurt {i}." for i in range(n_align)]
        self.align_answers = None
        self.user_pairs = [
            Pair(f"How do I harm {i}?", "Step one." + " more" * i) for i in range(n_user)
        ]
        self.defender_pairs = []
        self.pairs_source = "test"


class Task:
    name = "test"

    def __init__(self, n=24):
        from datamodules.tasks import TaskExample

        self.train = [
            TaskExample(f"Rate review {i}.", "", "positive", "positive") for i in range(n)
        ]


def datamodule(fmt, batch_size=2, n=8):
    return PoisonedFinetuneDataModule(
        Task(), Splits(), fmt, n=n, harmful_ratio=0.25, sample_seed=0, batch_size=batch_size, seed=0
    )


def lisa(rho=0.0, k1=2, k2=3, lr=1e-2, warmup=0.1, optimizer=torch.optim.SGD):
    return LisaModule(
        tiny_lora(),
        optimizer=partial(optimizer, lr=lr),
        rho=rho,
        align_steps=k1,
        finetune_steps=k2,
        alignment_batch_size=2,
        proximal_warmup=warmup,
    )
