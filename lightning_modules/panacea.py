"""Panacea (arXiv 2501.18100): fine-tuning that learns an adaptive perturbation ε.

Objective (max-max): max_w max_{‖ε‖≤ρ} λ·(h(w+ε) − h(w)) − g(w); the deployed model is w + ε
(added by the `post` stage, callbacks/perturbation.py). One optimizer step per batch:

1. G = ∇g(w) on the user's batch;            2. H = ∇h(w) on a defender-held harmful batch;
3. ε = ρ·H / (‖H‖ + 1e-7), ‖·‖ one global L2 norm over all trainable tensors;
4. H_ε = ∇h(w+ε) on the same harmful batch (w perturbed in place, then restored bit-exactly
   from a copy of the trainable tensors: LoRA tensors are small);
5. grad = G − λ·(H_ε − H); one optimizer step.

ε is module state: saved in checkpoints, restored on resume.
"""

from __future__ import annotations

from typing import Callable

import torch

from lightning_modules.causal_lm import CausalLMModule
from pipeline.models import trainable
from pipeline.validation import InputError


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together (not per layer)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class PanaceaModule(CausalLMModule):
    """rho: radius of ε (reference 1.0). lam: weight λ of the harmful-loss increase (reference 1e-3).
    harmful_batch_size: size of the defender's harmful batch per step (reference 10).
    harmful_loss_clamp: h(w+ε) is clamped at this value before its backward, as the reference
    does (5.0); null disables the clamp."""

    def __init__(self, model: torch.nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 rho: float = 1.0, lam: float = 1e-3, harmful_batch_size: int = 10,
                 harmful_loss_clamp: float | None = 5.0):
        super().__init__(model, optimizer, scheduler)
        self.automatic_optimization = False
        self.rho = rho
        self.lam = lam
        self.harmful_batch_size = harmful_batch_size
        self.harmful_loss_clamp = harmful_loss_clamp
        self.epsilon: dict[str, torch.Tensor] = {}
        self._harmful_batches = self._harmful_loader = None

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise InputError(
                f"defense=panacea refuses precision={precision}: fp16 with a grad scaler scales the "
                "gradients that ε is built from; use model.precision=bf16-mixed or 32-true")
        if self.trainer.world_size > 1:
            # Three backward passes per step inside one DDP forward, and ‖H‖ must come from the
            # all-reduced gradient: not implemented yet, so refuse rather than compute a wrong ε.
            raise InputError("defense=panacea runs in one process for now (trainer.devices=1); "
                             "multi-process synchronization of ε is not implemented yet")

    # --- the defender's harmful batches, cycled --------------------------------------------
    def on_train_start(self) -> None:
        self._harmful_loader = self.trainer.datamodule.defender_harmful_dataloader(self.harmful_batch_size)
        if len(self._harmful_loader.dataset) == 0:
            raise InputError("Panacea needs defender-held harmful samples: set data.n_defender >= 1")
        self._harmful_batches = iter(self._harmful_loader)

    def next_harmful_batch(self) -> dict:
        try:
            batch = next(self._harmful_batches)
        except StopIteration:
            self._harmful_batches = iter(self._harmful_loader)
            batch = next(self._harmful_batches)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- one step ---------------------------------------------------------------------------
    def _grads(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Backward `loss` and return a copy of the gradients, leaving .grad empty."""
        for p in params:
            p.grad = None
        self.manual_backward(loss)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return grads

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        names, params = zip(*trainable(self.model).items())
        params = list(params)

        g_loss = self.batch_loss(batch)
        G = self._grads(g_loss, params)
        harmful = self.next_harmful_batch()
        h_loss = self.batch_loss(harmful)
        H = self._grads(h_loss, params)

        with torch.no_grad():
            h_norm = global_norm(H)
            scale = self.rho / (h_norm + 1e-7)
            eps = [h * scale for h in H]
            backup = [p.detach().clone() for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        h_eps_loss = self.batch_loss(harmful)
        clamped = h_eps_loss if self.harmful_loss_clamp is None else torch.clamp(h_eps_loss, max=self.harmful_loss_clamp)
        H_eps = self._grads(clamped, params)
        with torch.no_grad():
            for p, w in zip(params, backup):
                p.copy_(w)
            for p, g, h, he in zip(params, G, H, H_eps):
                p.grad = g - self.lam * (he - h)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

        self.epsilon = {n: e.detach().clone() for n, e in zip(names, eps)}
        bs = batch["input_ids"].size(0)
        self.log_dict({"train/loss": g_loss.detach(), "train/harmful_loss": h_loss.detach(),
                       "train/harmful_loss_perturbed": h_eps_loss.detach(),
                       "train/harmful_grad_norm": h_norm}, prog_bar=True, batch_size=bs)

    # --- ε is state ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["panacea_epsilon"] = {k: v.cpu() for k, v in self.epsilon.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epsilon = dict(checkpoint.get("panacea_epsilon", {}))
