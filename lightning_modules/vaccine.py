"""Vaccine (arXiv 2402.01109): alignment that makes the hidden representations robust to a
perturbation of bounded norm (docs/methods.md, "Vaccine").

One optimizer step per alignment batch B (two forward-backward passes on the same batch):

1. forward f(w) on B, recording a_l, the output of each decoder layer's attention submodule (after
   its output projection, before the residual add); backward gives G_l = ∂f/∂a_l;
2. N = sqrt(Σ_l ‖G_l‖²): ONE norm over all layers, samples, tokens and hidden units (under several
   processes the sum runs over all of them, so each process's ε is its slice of one process's ε);
3. ε_l = ρ·G_l / (N + 1e-7), detached;
4. forward f on B again with a_l + ε_l in place of a_l in every layer, backward: the gradient;
5. one optimizer step (clipped by max_grad_norm, as every stage).

Same as the reference: the perturbed tensor, the global norm, the two passes. Differences, each an
exact equivalent or a documented option: the layers' submodules are found by their place in the
model (each decoder layer's attention child), not by class name; the forward hook returns a_l + ε_l
instead of overwriting `.data`; ∂f/∂a_l comes from tensor hooks; every hook is removed at the end
of each pass; `hook_target` may move the perturbation to the MLP output or the whole block's
output (the paper's "hidden embedding of each layer"). Pass 1 runs a full backward (its weight
gradients are discarded), which keeps DDP's and FSDP's gradient bookkeeping as in any step.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from lightning_modules.causal_lm import MultiPassModule
from lightning_modules.checks import nonnegative_problems, raise_problems
from lightning_modules.hooks import (
    HOOK_TARGETS,
    hooked_modules,
    perturbed_outputs,
    recording_output_grads,
)
from plumbing.errors import InputError
from plumbing.models import trainable


def global_perturbation(
    module: L.LightningModule, hidden_grads: list[torch.Tensor], rho: float
) -> list[torch.Tensor]:
    """ε_l = ρ·G_l / (N + 1e-7), N the norm over every given layer and, under several processes,
    over every process's samples (each G is of this process's share of the global-batch loss)."""
    squares = torch.stack([g.float().pow(2).sum() for g in hidden_grads]).sum()
    if module._trainer is not None and module.trainer.world_size > 1:
        squares = module.trainer.strategy.reduce(squares, reduce_op="sum")
    scale = rho / (torch.sqrt(squares) + 1e-7)
    return [(g * scale).to(g.dtype) for g in hidden_grads]


def two_pass_gradients(
    module: MultiPassModule,
    batch: dict,
    params: list[torch.nn.Parameter],
    hooked: list[torch.nn.Module],
    perturbation: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Vaccine's two passes on `batch` with the outputs of `hooked` perturbed by
    `perturbation(∂f/∂outputs)`: (f(w), f(w; ε), the gradient of f(w; ε) w.r.t. `params`)."""
    hidden_grads: list = [None] * len(hooked)
    with recording_output_grads(hooked, hidden_grads):
        loss = module.batch_loss(batch)
    module.manual_backward(loss)  # its weight gradients are not used: dropped below
    for p in params:
        p.grad = None
    missing = [i for i, g in enumerate(hidden_grads) if g is None]
    if missing:
        raise RuntimeError(f"no gradient reached the hooked outputs of layers {missing}")
    epsilon = perturbation(hidden_grads)
    del hidden_grads
    with perturbed_outputs(hooked, epsilon):
        perturbed_loss = module.batch_loss(batch)
        grads = module.gradients(perturbed_loss, params)
    return loss, perturbed_loss, grads


def refuse_gradient_checkpointing(model: torch.nn.Module, defense: str) -> None:
    if getattr(model, "is_gradient_checkpointing", False):
        raise InputError(
            f"defense={defense} refuses gradient checkpointing: the recomputed forward would fire "
            "its hooks again; turn checkpointing off"
        )


def hook_problems(values: dict) -> list[str]:
    problems = nonnegative_problems(values, ("rho",))
    target = values.get("hook_target", "attention")
    if target not in HOOK_TARGETS:
        problems.append(f"hook_target={target!r} must be one of {list(HOOK_TARGETS)}")
    return problems


class VaccineModule(MultiPassModule):
    """rho: norm ρ of the whole perturbation (Vaccine repo 2; Booster and Antibody repos 5; Panacea
    repo 20). It is spread over batch × length × layers × hidden entries, so a value is comparable
    only at the same batch size and max length.
    hook_target: attention (the reference: each attention submodule's output) | mlp | layer."""

    defense_name = "vaccine"
    hyperparameter_problems = staticmethod(hook_problems)

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        rho: float = 2.0,
        hook_target: str = "attention",
        max_grad_norm: float | None = None,
    ):
        raise_problems(self.hyperparameter_problems({"rho": rho, "hook_target": hook_target}))
        super().__init__(model, optimizer, scheduler, max_grad_norm)
        self.rho, self.hook_target = rho, hook_target

    def on_fit_start(self) -> None:
        super().on_fit_start()
        refuse_gradient_checkpointing(self.model, self.defense_name)

    def perturbation(self, hidden_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return global_perturbation(self, hidden_grads, self.rho)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        params = list(trainable(self.model).values())
        hooked = hooked_modules(self.model, self.hook_target)
        loss, perturbed_loss, grads = two_pass_gradients(
            self, batch, params, hooked, self.perturbation
        )
        self.optimizer_step_with(grads, params)
        bs = batch["input_ids"].size(0)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/perturbed_loss", perturbed_loss.detach(), batch_size=bs)
