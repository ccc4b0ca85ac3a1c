"""Post-fine-tuning transforms of the trainable (LoRA) weights: `post` stage callables.

Each is built from `conf/defense/*.yaml` (`post: {_target_: ...}`) and called with the run's
Experiment after fine-tuning; it changes the adapter in place.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.distributed import is_main
from pipeline.figures import new_figure, save_figure, write_csv
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
        if is_main():
            write_layer_norms(epsilon, exp.run_dir, name="epsilon", logger=exp.finetune_module.logger)


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


def write_layer_norms(tensors: dict[str, torch.Tensor], run_dir: Path, name: str, logger=None) -> list[dict]:
    """`<name>_layer_norms.csv` and `.png` (a bar per layer, stacked by module type); the figure
    and the per-layer norms are also logged to `logger` when one is given."""
    rows = layer_norms(tensors)
    write_csv(run_dir / f"{name}_layer_norms.csv", rows)
    layers = sorted({r["layer"] for r in rows})
    fig, axes = new_figure(width=max(6, len(layers) * 0.3))
    ax = axes[0][0]
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
    if logger:
        logger.log_metrics({f"{name}_norm/layer{r['layer']}_{r['module']}": r["norm"] for r in rows})
        logger.save()
    save_figure(fig, run_dir / f"{name}_layer_norms.png", logger)
    return rows
