"""T-Vaccine (arXiv 2410.09760): Vaccine applied to a few safety-critical layers at a time
(docs/methods.md, "T-Vaccine").

Every `probe_every` steps (K, reference 200): one forward-backward on a defender-held harmful batch
(reference: 1 sample) gives each decoder layer's attention-output gradient G_l; the layer
probabilities are p_l = ‖G_l‖ / Σ_l' ‖G_l'‖. Every `switch_every` steps (J, reference 20): S =
`active_layers` layers (reference 8) are drawn without replacement with probabilities p. Each step
is then Vaccine's two passes (lightning_modules/vaccine.py) with ε on the chosen layers only, its
norm over those layers; the LoRA tensors inside the other layers' hooked submodules get no update
(no gradient, hence no weight decay or moment update either, as the reference's frozen tensors);
tensors outside every hooked submodule (e.g. LoRA on the MLP) are trained at every step, as in
the reference, which freezes and unfreezes only the attention modules' tensors.

Differences from the reference, each a documented choice: the layers are drawn from a generator
seeded by (layer_seed, step), the same on every process (the reference's numpy draw is unseeded);
under several processes the probe's per-layer norms are averaged over processes (each probes its
own harmful sample), so every process draws the same layers; the gradients of the frozen tensors
are computed and dropped rather than never computed, and the reference's activation
checkpointing of the unchosen layers (a memory saving that needs modified model files) is not
reproduced: this module reproduces the method's arithmetic, not its memory profile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.causal_lm import DefenderBatchesModule
from lightning_modules.checks import batch_size_problems, raise_problems
from lightning_modules.hooks import hooked_modules, recording_output_grads
from lightning_modules.vaccine import (
    global_perturbation,
    hook_problems,
    refuse_gradient_checkpointing,
    two_pass_gradients,
)
from plumbing.errors import InputError
from plumbing.models import trainable


class TVaccineModule(DefenderBatchesModule):
    """rho: norm ρ of the perturbation of the chosen layers (reference README 3).
    active_layers: S, layers perturbed and trained at a time (reference 8).
    switch_every: J, steps between two draws of the layers (reference 20).
    probe_every: K, steps between two probes of the layer probabilities (reference 200).
    probe_batch_size: defender's harmful samples per probe and process (reference 1).
    hook_target: which output of each decoder layer is perturbed (hooks.py HOOK_TARGETS).
    layer_seed: seeds the draws of the layers, with the step."""

    defense_name = "t_vaccine"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        rho: float = 3.0,
        active_layers: int = 8,
        switch_every: int = 20,
        probe_every: int = 200,
        probe_batch_size: int = 1,
        hook_target: str = "attention",
        layer_seed: int = 0,
        max_grad_norm: float | None = None,
    ):
        raise_problems(
            self.hyperparameter_problems(
                {
                    "rho": rho,
                    "hook_target": hook_target,
                    "active_layers": active_layers,
                    "switch_every": switch_every,
                    "probe_every": probe_every,
                    "probe_batch_size": probe_batch_size,
                }
            )
        )
        super().__init__(model, optimizer, scheduler, probe_batch_size, max_grad_norm)
        self.rho, self.hook_target, self.layer_seed = rho, hook_target, layer_seed
        self.active_layers, self.switch_every, self.probe_every = (
            active_layers,
            switch_every,
            probe_every,
        )
        self.probabilities: torch.Tensor | None = None
        self.active: list[int] = []
        self.history: list[
            dict
        ] = []  # the chosen layers at each draw, the probabilities at each probe

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        problems = hook_problems(values)
        for key in ("active_layers", "switch_every", "probe_every", "probe_batch_size"):
            problems += batch_size_problems(values, key)
        return problems

    def on_fit_start(self) -> None:
        super().on_fit_start()
        refuse_gradient_checkpointing(self.model, self.defense_name)
        n_layers = len(hooked_modules(self.model, self.hook_target))
        if self.active_layers > n_layers:
            raise InputError(
                f"t_vaccine active_layers={self.active_layers} exceeds this model's {n_layers} "
                "decoder layers: lower defense.align.active_layers"
            )

    # --- the layer schedule -------------------------------------------------------------------
    def probe(
        self, hooked: list[torch.nn.Module], params: list[torch.nn.Parameter]
    ) -> torch.Tensor:
        """p_l = ‖G_l‖ / Σ ‖G‖ from one harmful batch (norms averaged over processes)."""
        harmful = self.harmful.next(self.device)
        grads: list = [None] * len(hooked)
        with recording_output_grads(hooked, grads):
            loss = self.batch_loss(harmful)
        self.manual_backward(loss)
        for p in params:
            p.grad = None
        norms = torch.stack([g.float().norm() for g in grads])
        if self._trainer is not None and self.trainer.world_size > 1:
            norms = self.trainer.strategy.reduce(norms, reduce_op="mean")
        return (norms / norms.sum()).detach().cpu()

    def choose_layers(self, step: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.layer_seed * 2**32 + step)
        drawn = torch.multinomial(
            self.probabilities, self.active_layers, replacement=False, generator=generator
        )
        return sorted(drawn.tolist())

    # --- one step -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        params = list(trainable(self.model).values())
        hooked = hooked_modules(self.model, self.hook_target)
        step = self.global_step
        if step % self.probe_every == 0 or self.probabilities is None:
            self.probabilities = self.probe(hooked, params)
            self.history.append({"step": step, "probabilities": self.probabilities.tolist()})
        if step % self.switch_every == 0 or not self.active:
            self.active = self.choose_layers(step)
            self.history.append({"step": step, "active": self.active})
        chosen = [hooked[i] for i in self.active]

        loss, perturbed_loss, grads = two_pass_gradients(
            self, batch, params, chosen, lambda g: global_perturbation(self, g, self.rho)
        )
        resting = {
            id(p) for i, m in enumerate(hooked) if i not in self.active for p in m.parameters()
        }
        self.optimizer_step_with(
            [None if id(p) in resting else g for p, g in zip(params, grads)], params
        )
        bs = batch["input_ids"].size(0)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/perturbed_loss", perturbed_loss.detach(), batch_size=bs)

    # --- state --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["t_vaccine"] = {
            "probabilities": self.probabilities,
            "active": self.active,
            "history": self.history,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("t_vaccine", {})
        self.probabilities = state.get("probabilities")
        self.active = list(state.get("active", []))
        self.history = list(state.get("history", []))
