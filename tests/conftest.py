"""Shared fixtures: the real config tree composed and shrunk to the tiny model (tests never
touch the network or the default model)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# The tiny model with small data: every stage in a few seconds.
TINY = [
    "model=tiny", "~logger", "data.n_align=16", "data.n_retain=4", "data.retain_max_new_tokens=6", "data.n_eval=6", "finetune.n=20",
    "align.epochs=1", "finetune.epochs=1", "eval.n_task=6", "eval.harmful_max_new_tokens=6",
    "eval.task_max_new_tokens=3", "eval.batch_size=4", "task.n_train=200", "task.n_test=20",
    "align.optimizer.lr=1e-2", "finetune.optimizer.lr=1e-2",
]


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: compose_cfg(tmp_path, *overrides)


@pytest.fixture(scope="session")
def tiny_formatter():
    from datamodules.formatting import PromptFormatter
    from pipeline.models import load_tiny_tokenizer

    return PromptFormatter(load_tiny_tokenizer(), "chat", max_length=96)


@pytest.fixture(scope="session")
def offline_splits():
    from datamodules.harmful import build_harmful_splits

    return build_harmful_splits(
        "pkg:pyrit/datasets/jailbreak/many_shot_examples.json",
        [{"path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt", "format": "seed_yaml"}],
        n_defender=100, n_align=200, n_eval=40, split_seed=0,
    )


class RecordRank(L.Callback):
    """Saves, per rank, the sample indices of every batch (user and defender) and the module's
    state after training, for comparison across ranks and against one process."""

    def __init__(self, out_dir, attrs=("epsilon",)):
        self.out_dir, self.attrs = out_dir, attrs
        self.user, self.harmful = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.user.append(batch["index"].tolist())
        if not getattr(module.harmful, "recorded", False):
            draw = module.harmful.next

            def recorded_draw(device):
                drawn = draw(device)
                self.harmful.append(drawn["index"].tolist())
                return drawn
            module.harmful.next, module.harmful.recorded = recorded_draw, True

    def on_train_end(self, trainer, module):
        state = {a: getattr(module, a) for a in self.attrs}
        params = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
        torch.save({"user": self.user, "harmful": self.harmful, "params": params, **state},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


class Pair:
    """A (prompt, answer) pair shaped like the datamodules' harmful pairs."""

    def __init__(self, prompt, answer):
        self.prompt, self.answer = prompt, answer


def tiny_lora():
    """The tiny model with LoRA on q/v and a nonzero B, so that every LoRA tensor has a gradient."""
    from pipeline.models import add_lora, build_tiny

    base, _ = build_tiny(init_seed=1)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def fit_steps(module, dm, steps, **kwargs):
    """Fit `module` for `steps` optimizer steps on CPU, without logger, checkpoints or bars."""
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer
