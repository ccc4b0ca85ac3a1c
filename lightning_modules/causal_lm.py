"""Causal-LM supervised fine-tuning of a LoRA adapter (the `sft` defense: no defense).

Defenses that change training subclass `CausalLMModule` and override `training_step`
(with `automatic_optimization = False` where they need several passes per step).
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.formatting import IGNORE_INDEX
from pipeline.models import trainable


def answer_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of next-token cross-entropy over answer tokens, and their counts.

    `labels` are the input ids with IGNORE_INDEX on prompt/padding tokens; position t predicts
    labels[t + 1]. Returns (sum_nll [B], n_answer_tokens [B]).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != IGNORE_INDEX
    return (token_nll * mask).sum(dim=1), mask.sum(dim=1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the batch (token-level, prompt masked)."""
    nll_sum, count = answer_token_nll(logits, labels)
    return nll_sum.sum() / count.sum().clamp(min=1)


class CausalLMModule(L.LightningModule):
    """SFT of the trainable (LoRA) parameters of `model` on answer tokens.

    optimizer: a partial taking the parameter list (Hydra `_partial_: true`).
    scheduler: an optional partial taking the optimizer (stepped every optimizer step).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(trainable(self.model).values())

    def batch_loss(self, batch: dict) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return answer_loss(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
