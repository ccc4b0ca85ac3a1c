"""Panacea (arXiv 2501.18100): fine-tuning that learns an adaptive perturbation ε.

Objective (max-max): max_w max_{‖ε‖≤ρ} λ·(h(w+ε) − h(w)) − g(w); the deployed model is w + ε
(added by the `post` stage, lightning_modules/post_transforms.py). One optimizer step per batch:

1. G = ∇g(w) on the user's batch;            2. H = ∇h(w) on a defender-held harmful batch;
3. ε = ρ·H / (‖H‖ + 1e-7), ‖·‖ one global L2 norm over all trainable tensors;
4. H_ε = ∇h(w+ε) on the same harmful batch (w perturbed in place, then restored bit-exactly
   from a copy of the trainable tensors: LoRA tensors are small);
5. grad = G − λ·(H_ε − H); one optimizer step.

ε is module state: saved in checkpoints, restored on resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.causal_lm import DefenderBatchesModule
from lightning_modules.checks import (
    batch_size_problems,
    is_number,
    nonnegative_problems,
    raise_problems,
)
from lightning_modules.gradients import full, global_norm, moved
from plumbing.models import trainable


class PanaceaModule(DefenderBatchesModule):
    """rho: radius of ε (reference 1.0). lam: weight λ of the harmful-loss increase (reference 1e-3).
    harmful_batch_size: defender's harmful samples per step and process (reference 10).
    harmful_loss_clamp: h(w+ε) is clamped at this value before its backward, as the reference
    does (5.0); null disables the clamp."""

    defense_name = "panacea"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        rho: float = 1.0,
        lam: float = 1e-3,
        harmful_batch_size: int = 10,
        harmful_loss_clamp: float | None = 5.0,
        max_grad_norm: float | None = None,
    ):
        raise_problems(
            self.hyperparameter_problems(
                {
                    "rho": rho,
                    "lam": lam,
                    "harmful_batch_size": harmful_batch_size,
                    "harmful_loss_clamp": harmful_loss_clamp,
                }
            )
        )
        super().__init__(model, optimizer, scheduler, harmful_batch_size, max_grad_norm)
        self.rho = rho
        self.lam = lam
        self.harmful_loss_clamp = harmful_loss_clamp
        self.epsilon: dict[str, torch.Tensor] = {}

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        """A negative ρ or λ would turn the perturbation or its penalty around; the clamp bounds a
        cross-entropy (>= 0), so one <= 0 would zero the harmful term."""
        problems = nonnegative_problems(values, ("rho", "lam")) + batch_size_problems(values)
        clamp = values.get("harmful_loss_clamp")
        if clamp is not None and (not is_number(clamp) or clamp <= 0):
            problems.append(f"harmful_loss_clamp={clamp!r} must be a number > 0, or null (off)")
        return problems

    # --- one step ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        names, params = zip(*trainable(self.model).items())
        params = list(params)

        g_loss = self.batch_loss(batch)
        G = self.gradients(g_loss, params)
        harmful = self.harmful.next(self.device)
        h_loss = self.batch_loss(harmful)
        H = self.gradients(h_loss, params)

        with torch.no_grad():
            h_norm = global_norm(H)
            scale = self.rho / (h_norm + 1e-7)
            eps = [h * scale for h in H]
        with moved(params, eps):
            h_eps_loss = self.batch_loss(harmful)
            clamped = (
                h_eps_loss
                if self.harmful_loss_clamp is None
                else torch.clamp(h_eps_loss, max=self.harmful_loss_clamp)
            )
            H_eps = self.gradients(clamped, params)
        self.optimizer_step_with([g - self.lam * (he - h) for g, h, he in zip(G, H, H_eps)], params)

        self.epsilon = {n: e.detach().clone() for n, e in zip(names, eps)}
        bs = batch["input_ids"].size(0)
        self.log_dict(
            {
                "train/loss": g_loss.detach(),
                "train/harmful_loss": h_loss.detach(),
                "train/harmful_loss_perturbed": h_eps_loss.detach(),
                "train/harmful_grad_norm": h_norm,
            },
            prog_bar=True,
            batch_size=bs,
        )

    # --- ε and the harmful-batch position are state -----------------------------------------------
    def on_train_end(self) -> None:
        """Under FSDP each rank holds a shard of ε: the post stage adds the whole of it."""
        self.epsilon = {n: full(e) for n, e in self.epsilon.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["panacea_epsilon"] = {k: full(v).cpu() for k, v in self.epsilon.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.epsilon = dict(checkpoint.get("panacea_epsilon", {}))
