"""Post-fine-tuning transforms of the trainable (LoRA) weights: a defense's `post` part.

Each is built from `conf/defense/post/*.yaml` (plus, when its constructor names them, the run's
`defender_pairs` and `formatter`) and called after fine-tuning with the model and the
LightningModule that fine-tuned it (None when the run starts after fine-tuning); it changes the
adapter in place. A transform's optional `summary` (a dict) goes to results.json `post_summary`.
"""

from __future__ import annotations

import torch

from datamodules.formatting import collate
from lightning_modules.checks import (
    count_problems,
    integer_problems,
    is_number,
    nonnegative_problems,
    raise_problems,
)
from lightning_modules.hooks import forward_hooks
from plumbing.errors import InputError
from plumbing.models import trainable


class AddPanaceaEpsilon:
    """Deploy w_T + ε, with ε the perturbation of Panacea's last step (callbacks/diagnostics.py
    plots its layer-wise norms, the paper's Fig. 5)."""

    def __call__(self, model: torch.nn.Module, finetuned_by=None) -> None:
        epsilon = getattr(finetuned_by, "epsilon", None)
        if not epsilon:
            raise InputError(
                "the post part panacea_epsilon needs the ε learned by Panacea's fine-tuning in the "
                "same run: use defense/finetune=panacea and include finetune in stages"
            )
        params = trainable(model)
        with torch.no_grad():
            for name, e in epsilon.items():
                params[name].add_(e.to(params[name].device, params[name].dtype))


class AddGaussianNoise:
    """The random-perturbation baseline: w_T + N(0, intensity²) on every trainable weight."""

    def __init__(self, intensity: float, seed: int = 0):
        raise_problems(self.hyperparameter_problems({"intensity": intensity, "seed": seed}))
        self.intensity = intensity
        self.seed = seed

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        return nonnegative_problems(values, ("intensity",)) + count_problems(values, ("seed",))

    def __call__(self, model: torch.nn.Module, finetuned_by=None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in trainable(model).values():
                noise = (
                    torch.randn(p.shape, generator=generator, dtype=torch.float32) * self.intensity
                )
                p.add_(noise.to(p.device, p.dtype))


def lora_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The adapter's trainable Linear maps (peft's lora_A / lora_B of every adapted projection)."""
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" in name and m.weight.requires_grad
    }
    if not found:
        raise InputError("the model has no trainable LoRA Linear maps to prune")
    return found


def input_second_moments(
    modules: dict[str, torch.nn.Linear], model: torch.nn.Module, batches
) -> dict[str, torch.Tensor]:
    """s_j = (1/|C|)·Σ_sequences Σ_tokens x_j², the input feature j of each module over the real
    (attention mask 1) tokens of every calibration sequence, in float32: Wanda's activation term."""
    names = list(modules)
    sums = [torch.zeros(modules[n].in_features) for n in names]
    n_sequences = 0
    mask: torch.Tensor | None = None

    def hook_for(index):
        def hook(module, args, output):
            x = args[0].detach().float() * mask.unsqueeze(-1)
            sums[index] += x.pow(2).sum(dim=(0, 1)).cpu()

        return hook

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forward_hooks([modules[n] for n in names], hook_for):
            for batch in batches:
                mask = batch["attention_mask"].float()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                n_sequences += batch["input_ids"].size(0)
    finally:
        model.train(was_training)
    return {name: s / max(n_sequences, 1) for name, s in zip(names, sums)}


def rows_to_zero(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference's per-row rule: sort each row's scores ascending, keep the lowest
    int(in·(1 − ratio)), zero the rest (the most harmful-salient); a bool mask of the zeroed."""
    n_in = scores.size(1)
    keep = int(n_in * (1 - ratio))
    order = torch.argsort(scores, dim=1, stable=True)
    zeroed = torch.ones_like(scores, dtype=torch.bool)
    zeroed.scatter_(1, order[:, :keep], False)
    return zeroed


class AntidotePrune:
    """Antidote (arXiv 2408.09600): one-shot pruning of the fine-tuned LoRA weights that matter
    most on harmful data. Wanda score S_ij = |W_ij|·sqrt(s_j), s_j the mean over calibration
    sequences of Σ_tokens x_j² (x: the module's input) on the defender's harmful pairs; in each
    output row the int(in·(1 − ratio)) lowest-scoring entries stay, the rest are zeroed (so with
    few inputs, as a LoRA B's r, the realized fraction exceeds `ratio`: reported in
    `realized_fraction`). Every trainable LoRA Linear (lora_A and lora_B) is pruned.

    ratio: prune ratio ρ_d in [0, 1] (reference 0.1 for SST2, 0.05 for AGNews).
    calibration_samples: defender pairs used (reference 2000; at most the pool, data.n_defender).
    batch_size: calibration sequences per forward (padding excluded from the scores, so any batch
    size gives the reference's batch-1 values)."""

    def __init__(
        self,
        ratio: float = 0.1,
        calibration_samples: int = 2000,
        batch_size: int = 8,
        defender_pairs=(),
        formatter=None,
    ):
        problems = self.hyperparameter_problems({"ratio": ratio, "batch_size": batch_size})
        if problems:
            raise InputError("antidote " + "; ".join(problems))
        if not defender_pairs or formatter is None:
            raise InputError(
                "antidote needs calibration data, the defender's harmful pairs: set data.n_defender >= 1"
            )
        self.ratio = ratio
        self.pairs = list(defender_pairs)[:calibration_samples]
        self.batch_size = batch_size
        self.formatter = formatter
        self.realized_fraction: float | None = None

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        ratio = values.get("ratio", 0.1)
        problems = (
            []
            if is_number(ratio) and 0 <= ratio <= 1
            else [f"ratio={ratio!r} must be a number in [0, 1]"]
        )
        sizes = {key: values.get(key, 1) for key in ("calibration_samples", "batch_size")}
        return problems + integer_problems(sizes, least=1)

    @property
    def summary(self) -> dict:
        """What results.json records as `post_summary`."""
        return {
            "ratio": self.ratio,
            "calibration_samples": len(self.pairs),
            "realized_fraction": self.realized_fraction,
        }

    def calibration_batches(self, device: torch.device):
        encoded = [
            self.formatter.encode(self.formatter.prompt(p.prompt), p.answer) for p in self.pairs
        ]
        pad = self.formatter.tokenizer.pad_token_id
        for start in range(0, len(encoded), self.batch_size):
            batch = collate(encoded[start : start + self.batch_size], pad_id=pad)
            yield {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def __call__(self, model: torch.nn.Module, finetuned_by=None) -> None:
        modules = lora_linears(model)
        device = next(model.parameters()).device
        moments = input_second_moments(modules, model, self.calibration_batches(device))
        zeroed_total = entries = 0
        with torch.no_grad():
            for name, m in modules.items():
                scores = m.weight.detach().float().abs().cpu() * moments[name].sqrt().unsqueeze(0)
                zeroed = rows_to_zero(scores, self.ratio).to(m.weight.device)
                m.weight.masked_fill_(zeroed, 0.0)
                zeroed_total += int(zeroed.sum())
                entries += zeroed.numel()
        self.realized_fraction = zeroed_total / entries
