"""Gather a sweep's results.json files into the papers' table and plots.

    python -m orchestration.sweep_report multirun/<sweep_name> [--out DIR]

Rows: the swept settings other than harmful_ratio and seed (usually `defense`); columns:
harmful_ratio; cells: HS and FA as mean ± std (sample std, ddof 1) over the seeds that finished.
The expected grid is read from the sweep's multirun.yaml, so a point that failed (failed.json) or
never finished is shown as such in its cell, never silently dropped. Writes table.md, table.csv,
hs_vs_ratio.png, fa_vs_ratio.png and hs_fa_tradeoff.png (to the sweep directory by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from evaluation.results import RESULTS, read_results
from orchestration.sweep import FAILED
from plumbing.figures import new_figure, save_figure, write_csv
from plumbing.io import atomic_write_text

COLUMN, REPEAT = "harmful_ratio", "seed"
METRICS = {"HS": "harmful_score", "FA": "finetune_accuracy"}


@dataclass
class Point:
    overrides: dict[str, str]
    status: str  # done | failed | missing
    results: dict = field(default_factory=dict)
    error: str = ""


def split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def expected_grid(sweep_dir: Path) -> list[dict[str, str]]:
    """The grid the sweeper expanded: `hydra.sweeper.params` (experiment files) + command-line overrides."""
    config = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    params = config["hydra"].get("sweeper", {}).get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config["hydra"]["overrides"]["task"])
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return [dict(split(o) for o in job) for job in jobs]


def collect(sweep_dir: Path) -> list[Point]:
    """Every expected point with its status; points found on disk but not in the grid are added."""
    found: dict[frozenset, Path] = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        found[frozenset(yaml.safe_load(overrides_file.read_text()) or [])] = (
            overrides_file.parent.parent
        )
    grid = expected_grid(sweep_dir) if (sweep_dir / "multirun.yaml").is_file() else []
    keys = {frozenset(f"{k}={v}" for k, v in point.items()) for point in grid}
    grid += [dict(split(o) for o in key) for key in found if key not in keys]
    points = []
    for overrides in grid:
        folder = found.get(frozenset(f"{k}={v}" for k, v in overrides.items()))
        if folder is not None and (folder / RESULTS).is_file():
            points.append(Point(overrides, "done", read_results(folder / RESULTS)))
        elif folder is not None and (folder / FAILED).is_file():
            points.append(
                Point(overrides, "failed", error=json.loads((folder / FAILED).read_text())["error"])
            )
        else:
            points.append(Point(overrides, "missing"))
    return points


def row_label(point: Point, swept: list[str]) -> str:
    keys = [k for k in swept if k not in (COLUMN, REPEAT)]
    if keys == ["defense"]:
        return point.overrides["defense"]
    if keys:
        return ", ".join(f"{k}={point.overrides.get(k, '')}" for k in keys)
    return point.results.get("defense") or point.overrides.get("defense", "(default)")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(points: list[Point]) -> list[dict]:
    """One row per (label, harmful_ratio): means/stds over seeds and the count of each status."""
    varying = {
        k for p in points for k in p.overrides if len({q.overrides.get(k) for q in points}) > 1
    }
    swept = sorted(varying)
    cells: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        ratio = p.overrides.get(COLUMN, str(p.results.get(COLUMN, "?")))
        cells.setdefault((row_label(p, swept), ratio), []).append(p)
    rows = []
    for (label, ratio), group in cells.items():
        done = [p for p in group if p.status == "done"]
        row = {
            "row": label,
            COLUMN: ratio,
            "seeds_done": len(done),
            "failed": sum(p.status == "failed" for p in group),
            "missing": sum(p.status == "missing" for p in group),
        }
        for short, key in METRICS.items():
            row[f"{short}_mean"], row[f"{short}_std"] = mean_std([p.results[key] for p in done])
        row["errors"] = "; ".join(sorted({p.error for p in group if p.error}))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["row"], _as_float(r[COLUMN])))


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def cell_text(row: dict) -> str:
    text = f"{fmt(row['HS_mean'], row['HS_std'])} / {fmt(row['FA_mean'], row['FA_std'])}"
    notes = [f"{row['seeds_done']} seeds"] if row["seeds_done"] else []
    notes += [f"**{row['failed']} failed**"] if row["failed"] else []
    notes += [f"{row['missing']} missing"] if row["missing"] else []
    if not row["seeds_done"]:
        text = "FAILED" if row["failed"] else "missing"
    return f"{text} ({', '.join(notes)})" if notes else text


def markdown(rows: list[dict]) -> str:
    ratios = sorted({r[COLUMN] for r in rows}, key=_as_float)
    labels = list(dict.fromkeys(r["row"] for r in rows))
    lookup = {(r["row"], r[COLUMN]): r for r in rows}
    lines = [
        "HS / FA (%), mean ± std over seeds; lower HS and higher FA are better.",
        "",
        "| defense | " + " | ".join(f"p = {x}" for x in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for label in labels:
        cells = [cell_text(lookup[(label, x)]) if (label, x) in lookup else "–" for x in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = [f"- {r['row']}, p = {r[COLUMN]}: {r['errors']}" for r in rows if r["errors"]]
    if errors:
        lines += ["", "Failed points:", *errors]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    labels = list(dict.fromkeys(r["row"] for r in rows))
    for short, name in (("HS", "hs_vs_ratio"), ("FA", "fa_vs_ratio")):
        fig, axes = new_figure()
        ax = axes[0][0]
        for label in labels:
            mine = [r for r in rows if r["row"] == label and r[f"{short}_mean"] is not None]
            ax.errorbar(
                [_as_float(r[COLUMN]) for r in mine],
                [r[f"{short}_mean"] for r in mine],
                yerr=[r[f"{short}_std"] or 0.0 for r in mine],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set(xlabel="harmful ratio p", ylabel=f"{short} (%)", title=f"{short} vs harmful ratio")
        ax.legend(fontsize=7)
        save_figure(fig, out / f"{name}.png")
    fig, axes = new_figure()
    ax = axes[0][0]
    for label in labels:
        mine = [r for r in rows if r["row"] == label and r["HS_mean"] is not None]
        ax.scatter([r["FA_mean"] for r in mine], [r["HS_mean"] for r in mine], label=label)
        for r in mine:
            ax.annotate(f"p={r[COLUMN]}", (r["FA_mean"], r["HS_mean"]), fontsize=6)
    ax.set(xlabel="FA (%)", ylabel="HS (%)", title="HS–FA trade-off (bottom right is better)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "hs_fa_tradeoff.png")


def report(sweep_dir: Path, out: Path | None = None) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(
            f"error: no sweep directory {sweep_dir}; pass the multirun/<sweep_name> directory"
        )
    out = Path(out or sweep_dir)
    rows = summarize(collect(sweep_dir))
    if not rows:
        raise SystemExit(
            f"error: {sweep_dir} holds no grid points (no multirun.yaml, no */.hydra/overrides.yaml)"
        )
    atomic_write_text(out / "table.md", markdown(rows))
    write_csv(out / "table.csv", rows)
    plot(rows, out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the sweep directory)"
    )
    args = parser.parse_args()
    report(args.sweep_dir, args.out)
    print((Path(args.out or args.sweep_dir) / "table.md").read_text())


if __name__ == "__main__":
    main()
