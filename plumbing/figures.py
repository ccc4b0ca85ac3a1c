"""Diagnostics on disk and in the experiment logger: CSV tables and matplotlib figures.

Figures are saved as PNG in the run directory and, when the logger can show images (W&B,
TensorBoard), logged there too; the CSV logger keeps the PNG on disk only.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogFormatter


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1):
    return plt.subplots(1, ncols, figsize=(width, height), squeeze=False)


def plain_log_x(ax) -> None:
    """A log-scaled x axis labelled with plain numbers (0.1, 1.2, 10). Matplotlib's default labels
    every tick of a range within one decade as 1.2×10^0, 1.4×10^0, ..., which overlap; its
    LogFormatter still thins the minor labels of a wider range."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def save_figure(fig, path: Path, logger=None) -> None:
    """Write `fig` as PNG, log it to `logger` when it can show images, close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if logger:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=path.stem, images=[str(path)])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):  # TensorBoardLogger
            logger.experiment.add_figure(path.stem, fig)
    plt.close(fig)
