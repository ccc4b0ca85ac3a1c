"""Lisa (arXiv 2405.18641): fine-tuning that alternates between alignment steps and user steps,
each pulled towards the other state's last weights (docs/methods.md, "Lisa").

State: the mode (alignment or finetune), a clock, two anchors W_align and W_ft (copies of the
trainable tensors, both starting at w_0). One optimizer step per user batch the loader yields,
exactly as the reference schedules them:
- start in alignment mode if align_steps (K1) > 0, else fine-tune throughout;
- alignment mode: if clock % K1 == 0 and step > 0 and K2 > 0, switch to finetune (W_align ← w,
  clock ← 0) and train on the user batch; otherwise the user batch is DISCARDED and the next
  alignment batch is trained on instead;
- finetune mode: if clock % K2 == 0 and step > 0 and K1 > 0, switch to alignment (W_ft ← w,
  clock ← 0) and train on an alignment batch instead of the user batch;
- loss = CE(batch) + [step > 0.1·T]·(ρ/2)·‖w − anchor‖², anchor = W_ft in alignment mode and
  W_align in finetune mode, T the stage's number of optimizer steps (the reference leaves the
  proximal term out for the first 10% of steps);
- clock += 1 after every step.
With K1 = 1/10 of K1 + K2 the user data is therefore seen 10% fewer times than by SFT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from datamodules.cycling import CyclingBatches
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.checks import (
    batch_size_problems,
    count_problems,
    nonnegative_problems,
    raise_problems,
)
from lightning_modules.gradients import full, placed_like
from plumbing.errors import InputError
from plumbing.models import trainable

log = logging.getLogger(__name__)
ALIGNMENT, FINETUNE = "alignment", "finetune"


class LisaModule(CausalLMModule):
    """rho: weight ρ of the proximal term (Lisa repo 1; Booster and Antibody repos 0.01).
    align_steps: K1, alignment steps per cycle (reference 100). finetune_steps: K2, user steps per
    cycle (reference 900). alignment_batch_size: alignment samples per alignment step and process
    (the reference: the user batch size). proximal_warmup: the fraction of steps without the
    proximal term (reference 0.1)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        rho: float = 1.0,
        align_steps: int = 100,
        finetune_steps: int = 900,
        alignment_batch_size: int = 8,
        proximal_warmup: float = 0.1,
        max_grad_norm: float | None = None,
    ):
        raise_problems(
            self.hyperparameter_problems(
                {
                    "rho": rho,
                    "align_steps": align_steps,
                    "finetune_steps": finetune_steps,
                    "alignment_batch_size": alignment_batch_size,
                    "proximal_warmup": proximal_warmup,
                }
            )
        )
        super().__init__(model, optimizer, scheduler, max_grad_norm)
        self.rho, self.proximal_warmup = rho, proximal_warmup
        self.align_steps, self.finetune_steps = align_steps, finetune_steps
        self.alignment_batch_size = alignment_batch_size
        self.alignment: CyclingBatches | None = None
        self.mode = ALIGNMENT if align_steps > 0 else FINETUNE
        self.clock = 0
        self.anchors: dict[str, dict[str, torch.Tensor]] = {}
        self.modes: list[str] = []  # the mode of every step taken

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        problems = nonnegative_problems(values, ("rho",))
        problems += count_problems(values, ("align_steps", "finetune_steps"))
        problems += batch_size_problems(values, "alignment_batch_size")
        warmup = values.get("proximal_warmup", 0.1)
        if not (isinstance(warmup, (int, float)) and 0 <= warmup <= 1):
            problems.append(f"proximal_warmup={warmup!r} must be a number in [0, 1]")
        return problems

    def on_train_start(self) -> None:
        params = trainable(self.model)
        if self.anchors:  # a resumed run keeps its own, restored on the CPU
            self.anchors = {k: placed_like(anchor, params) for k, anchor in self.anchors.items()}
        else:  # both anchors start at w_0
            weights = {n: p.detach().clone() for n, p in params.items()}
            self.anchors = {
                ALIGNMENT: weights,
                FINETUNE: {n: w.clone() for n, w in weights.items()},
            }
        if self.align_steps == 0:
            return
        steps = self.trainer.estimated_stepping_batches
        if self.align_steps >= steps and self.global_step == 0:
            log.warning(
                "lisa: align_steps=%d (K1) >= the %d steps of this fine-tuning: every step is an "
                "alignment step and the user's data is never trained on; lower "
                "defense.finetune.align_steps and finetune_steps (the reference's 1:9 proportion)",
                self.align_steps,
                steps,
            )
        loader = self.trainer.datamodule.alignment_dataloader(
            self.alignment_batch_size,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
        )
        if len(loader.dataset) == 0:
            raise InputError("lisa needs alignment data during fine-tuning: set data.n_align >= 1")
        self.alignment = self.cycled("alignment", loader)

    def next_mode(self, step: int) -> tuple[str, bool]:
        """(the mode of this step, whether it switches into it), by the reference's rule."""
        k1, k2 = self.align_steps, self.finetune_steps
        if self.mode == ALIGNMENT and step > 0 and k2 > 0 and self.clock % k1 == 0:
            return FINETUNE, True
        if self.mode == FINETUNE and step > 0 and k1 > 0 and self.clock % k2 == 0:
            return ALIGNMENT, True
        return self.mode, False

    def proximal_term(self, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
        """(ρ/2)·‖w − anchor‖², its gradient ρ(w − anchor)."""
        params = trainable(self.model)
        return self.rho / 2 * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        mode, switched = self.next_mode(step)
        if switched:  # the state being left: its weights become its anchor
            left = ALIGNMENT if mode == FINETUNE else FINETUNE
            self.anchors[left] = {n: p.detach().clone() for n, p in trainable(self.model).items()}
            self.clock = 0
        self.mode = mode
        if mode == ALIGNMENT:
            batch = self.alignment.next(self.device)  # the user batch is discarded
        loss = self.batch_loss(batch)
        total = loss
        if self.rho > 0 and step > self.proximal_warmup * self.trainer.estimated_stepping_batches:
            anchor = self.anchors[FINETUNE if mode == ALIGNMENT else ALIGNMENT]
            total = loss + self.proximal_term(anchor)
        self.clock += 1
        self.modes.append(mode)
        bs = batch["input_ids"].size(0)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/alignment_step", float(mode == ALIGNMENT), batch_size=bs)
        return total

    # --- state --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lisa"] = {
            "mode": self.mode,
            "clock": self.clock,
            "anchors": {
                k: {n: full(t).cpu() for n, t in anchor.items()}
                for k, anchor in self.anchors.items()
            },
            "modes": self.modes,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lisa", {})
        self.mode = state.get("mode", self.mode)
        self.clock = state.get("clock", 0)
        self.anchors = state.get("anchors", {})
        self.modes = list(state.get("modes", []))
