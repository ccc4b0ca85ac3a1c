"""Booster (arXiv 2409.01586): alignment that attenuates the harmful perturbation a later harmful
fine-tuning step would cause (docs/methods.md, "Booster").

Objective: min_w f(w) + λ·[h(w) − h(w − α·∇h(w)/‖∇h(w)‖)], with f the alignment loss and h the
loss on defender-held harmful pairs. One optimizer step per alignment batch B_a, with one harmful
batch B_h drawn for the whole step:

1. H = ∇h(w) on B_h;
2. w ← w − α·H/(‖H‖ + 1e-7) in place (the simulated harmful step), ‖·‖ one global L2 norm;
3. H' = ∇h at the moved weights, on the SAME B_h; restore w bit-exactly from a copy;
4. A = ∇f(w) on B_a;
5. grad = A + λ·(H − H'); one optimizer step (clipped, as every stage, by max_grad_norm).

Three forward-backward passes per step, as the reference. Deviations from the reference code,
all documented options or exact equivalents: the harmful batch size is a key (the reference
hard-codes 10), the harmful batches come from a seeded sampler (the reference's is unseeded),
and the weights are restored from a copy (the reference adds the step back, which rounds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.causal_lm import DefenderBatchesModule
from lightning_modules.checks import batch_size_problems, nonnegative_problems, raise_problems
from lightning_modules.gradients import global_norm, moved
from plumbing.models import trainable


class BoosterModule(DefenderBatchesModule):
    """lam: weight λ of the harmful-loss reduction term (Booster repo 5; Panacea repo 100).
    alpha: step size α of the simulated harmful step (Booster repo 0.1; Panacea repo 0.01).
    harmful_batch_size: defender's harmful samples per step and process (Booster repo 10)."""

    defense_name = "booster"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        lam: float = 5.0,
        alpha: float = 0.1,
        harmful_batch_size: int = 10,
        max_grad_norm: float | None = None,
    ):
        raise_problems(
            self.hyperparameter_problems(
                {"lam": lam, "alpha": alpha, "harmful_batch_size": harmful_batch_size}
            )
        )
        super().__init__(model, optimizer, scheduler, harmful_batch_size, max_grad_norm)
        self.lam, self.alpha = lam, alpha

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        return nonnegative_problems(values, ("lam", "alpha")) + batch_size_problems(values)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        params = list(trainable(self.model).values())
        harmful = self.harmful.next(self.device)

        h_loss = self.batch_loss(harmful)
        H = self.gradients(h_loss, params)
        with torch.no_grad():
            h_norm = global_norm(H)
            attack = [-self.alpha * h / (h_norm + 1e-7) for h in H]
        with moved(params, attack):
            h_attacked_loss = self.batch_loss(harmful)
            H_attacked = self.gradients(h_attacked_loss, params)
        a_loss = self.batch_loss(batch)
        A = self.gradients(a_loss, params)
        with torch.no_grad():
            grads = [a + self.lam * (h - ha) for a, h, ha in zip(A, H, H_attacked)]
        self.optimizer_step_with(grads, params)

        bs = batch["input_ids"].size(0)
        self.log_dict(
            {
                "train/harmful_loss": h_loss.detach(),
                "train/harmful_loss_after_attack": h_attacked_loss.detach(),
                "train/harmful_loss_reduction": (h_loss - h_attacked_loss).detach(),
                "train/harmful_grad_norm": h_norm,
            },
            batch_size=bs,
        )
        self.log("train/loss", a_loss.detach(), prog_bar=True, batch_size=bs)
