"""Post-fine-tuning transforms of the trainable (LoRA) weights: `post` stage callables.

Each is built from `conf/defense/*.yaml` (`post: {_target_: ...}`) and called with the run's
Experiment after fine-tuning; it changes the adapter in place.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.models import trainable
from pipeline.validation import InputError


class AddPanaceaEpsilon:
    """Deploy w_T + ε, with ε the perturbation of Panacea's last step; also writes the layer-wise
    norms of ε (paper Fig. 5) as CSV and PNG in the run directory."""

    def __call__(self, exp) -> None:
        epsilon = getattr(exp.finetune_module, "epsilon", None)
        if not epsilon:
            raise InputError("defense=panacea's post stage needs the ε learned by its finetune stage "
                             "in the same run: include finetune in stages")
        params = trainable(exp.model)
        with torch.no_grad():
            for name, e in epsilon.items():
                params[name].add_(e.to(params[name].device, params[name].dtype))
        write_layer_norms(epsilon, exp.run_dir, name="epsilon")


class AddGaussianNoise:
    """The random-perturbation baseline: w_T + N(0, intensity²) on every trainable weight."""

    def __init__(self, intensity: float, seed: int = 0):
        if intensity < 0:
            raise InputError(f"random perturbation intensity={intensity} must be >= 0")
        self.intensity = intensity
        self.seed = seed

    def __call__(self, exp) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in trainable(exp.model).values():
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * self.intensity
                p.add_(noise.to(p.device, p.dtype))


_LAYER = re.compile(r"layers\.(\d+)\.")
_MODULE = re.compile(r"\.(\w+_proj)\.")


def layer_norms(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """L2 norm of the given tensors grouped per (layer, module type), e.g. (3, 'q_proj')."""
    squares: dict[tuple[int, str], float] = defaultdict(float)
    for name, t in tensors.items():
        layer, module = _LAYER.search(name), _MODULE.search(name)
        key = (int(layer.group(1)) if layer else -1, module.group(1) if module else "other")
        squares[key] += float(t.float().pow(2).sum())
    return [{"layer": layer, "module": module, "norm": value ** 0.5}
            for (layer, module), value in sorted(squares.items())]


def write_layer_norms(tensors: dict[str, torch.Tensor], run_dir: Path, name: str) -> list[dict]:
    """`<name>_layer_norms.csv` and `.png` (a bar per layer, stacked by module type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_norms(tensors)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f"{name}_layer_norms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "module", "norm"])
        writer.writeheader()
        writer.writerows(rows)
    layers = sorted({r["layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 3.5))
    bottom = [0.0] * len(layers)
    for module in sorted({r["module"] for r in rows}):
        values = [next((r["norm"] for r in rows if r["layer"] == layer and r["module"] == module), 0.0)
                  for layer in layers]
        ax.bar(layers, values, bottom=bottom, label=module)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("transformer layer")
    ax.set_ylabel(f"‖{name}‖ (L2, per module)")
    ax.set_title(f"Layer-wise norm of {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / f"{name}_layer_norms.png", dpi=120)
    plt.close(fig)
    return rows
