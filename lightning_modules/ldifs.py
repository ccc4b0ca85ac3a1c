"""LDIFS (a baseline of the Booster and Antidote papers): fine-tuning regularized by the distance
of the MLP features from those of the model at the start of fine-tuning (docs/methods.md, "LDIFS").

For each decoder layer l, with m_l the MLP output on the step's batch and m_l^0 the same output of
the starting model (the same base with the adapter's starting values):
  d_l = (ρ/2)·‖m_l − m_l^0‖²    (Frobenius over the batch's real tokens)
  loss = CE(batch) + Σ_l [d_l < drop_above]·d_l
The reference drops every layer whose term reaches 0.1 (its comment: overflowing layers), which
also drops the layers that drifted most.

Differences from the reference, each an exact equivalent or a documented choice: padding
positions are left out of the distance (the reference's tensor norm includes them, which makes the
term depend on how the samples happen to be padded together, so that a batch split over processes
would not give one process's term); the starting
model is the adapter's starting tensors swapped into this model under no_grad (the reference
deep-copies the whole model and lets gradients flow into the copy, which changes nothing in the
update but costs the model's memory twice); the reference's own clip at norm 5 inside the step is
subsumed by the stage's clip at 1.0 (max_grad_norm), which every reference run also applied after
it. Under several processes the terms are summed over processes before the threshold, and each
process's term is scaled by the number of processes so that the averaged gradient is that of the
global batch's term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.checks import nonnegative_problems, raise_problems
from lightning_modules.gradients import full, holding, placed_like
from lightning_modules.hooks import hooked_modules, recording_outputs
from plumbing.models import trainable


class LDIFSModule(CausalLMModule):
    """rho: ρ (the Antidote scripts: 1e-4). drop_above: a layer's term counts only below this
    (reference 0.1; null keeps every layer)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        rho: float = 1e-4,
        drop_above: float | None = 0.1,
        max_grad_norm: float | None = None,
    ):
        raise_problems(self.hyperparameter_problems({"rho": rho, "drop_above": drop_above}))
        super().__init__(model, optimizer, scheduler, max_grad_norm)
        self.rho, self.drop_above = rho, drop_above
        self.start: dict[str, torch.Tensor] = {}

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        keys = ("rho", "drop_above") if values.get("drop_above") is not None else ("rho",)
        return nonnegative_problems(values, keys)

    def on_train_start(self) -> None:
        params = trainable(self.model)
        if self.start:  # a resumed run keeps the start it saved, restored on the CPU
            self.start = placed_like(self.start, params)
        else:
            self.start = {n: p.detach().clone() for n, p in params.items()}

    def features_and_loss(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every decoder layer's MLP output, and the batch loss, from one forward pass."""
        mlps = hooked_modules(self.model, "mlp")
        outputs: list = [None] * len(mlps)
        with recording_outputs(mlps, outputs):
            loss = self.batch_loss(batch)
        return outputs, loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        params = trainable(self.model)
        with torch.no_grad(), holding(list(params.values()), [self.start[n] for n in params]):
            start_features, _ = self.features_and_loss(batch)
        features, loss = self.features_and_loss(batch)
        real = batch["attention_mask"].unsqueeze(-1).float()  # padding is not data
        terms = [
            self.rho / 2 * ((m.float() - m0.float()) * real).pow(2).sum()
            for m, m0 in zip(features, start_features, strict=True)
        ]
        world = self.trainer.world_size if self._trainer is not None else 1
        global_terms = torch.stack(terms).detach()
        if world > 1:
            global_terms = self.trainer.strategy.reduce(global_terms, reduce_op="sum")
        below = [self.drop_above is None or bool(g < self.drop_above) for g in global_terms]
        kept = [t for t, keep in zip(terms, below) if keep]
        regularizer = world * sum(kept) if kept else loss.new_zeros(())
        bs = batch["input_ids"].size(0)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        # every layer's term, the dropped ones too; the regulariser is the kept ones' sum
        self.log("train/feature_distance", global_terms.sum(), batch_size=bs)
        kept_sum = sum((g for g, keep in zip(global_terms, below) if keep), loss.new_zeros(()))
        self.log("train/regularizer", kept_sum, batch_size=bs)
        self.log("train/layers_kept", float(len(kept)), batch_size=bs)
        return loss + regularizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ldifs_start"] = {n: full(t).cpu() for n, t in self.start.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.start = dict(checkpoint.get("ldifs_start", {}))
