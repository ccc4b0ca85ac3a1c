"""Post-fine-tuning transforms of the trainable (LoRA) weights: a defense's `post` part.

Each is built from `conf/defense/post/*.yaml` and called after fine-tuning with the model and the
LightningModule that fine-tuned it (None when the run starts after fine-tuning); it changes the
adapter in place.
"""

from __future__ import annotations

import torch

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
        if intensity < 0:
            raise InputError(f"random perturbation intensity={intensity} must be >= 0")
        self.intensity = intensity
        self.seed = seed

    def __call__(self, model: torch.nn.Module, finetuned_by=None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in trainable(model).values():
                noise = (
                    torch.randn(p.shape, generator=generator, dtype=torch.float32) * self.intensity
                )
                p.add_(noise.to(p.device, p.dtype))
