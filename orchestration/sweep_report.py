"""Gather a sweep's results.json files into the papers' table and plots, with intervals and
paired tests against `sft` or another row (evaluation/statistics.py).

    python -m orchestration.sweep_report multirun/<sweep_name> [--out DIR] [--level 0.95]
        [--baseline sft]

Rows: the swept settings other than harmful_ratio and the seeds (usually `defense`); columns:
harmful_ratio; cells: HS and FA as the mean over the seeds that finished with its t interval
(flagged when fewer than 3 seeds), and, for every defense other than the baseline (`sft`, or
`--baseline`: e.g. a defense against its own ablation), the exact McNemar p-value of its
per-prompt outcomes against the baseline's at the same ratio and seed on the same prompts, pooled
over the seeds both finished.
The expected grid is read from the sweep's multirun.yaml, so a point that failed (failed.json) or
never finished is shown as such in its cell, never silently dropped. table.md ends with the compute the points took (their stage seconds).
Writes table.md, table.csv, hs_vs_ratio.png, fa_vs_ratio.png and hs_fa_tradeoff.png (to the sweep
directory by default).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from evaluation.results import RESULTS, read_results
from evaluation.statistics import DEFAULT_LEVEL, check_level, mcnemar_exact, mean_interval
from orchestration.report_cli import report_parser
from orchestration.sweep import FAILED, GRIDS, NOT_IDENTITY
from plumbing.errors import InputError
from plumbing.figures import new_figure, save_figure, write_csv
from plumbing.io import atomic_write_text, read_jsonl

COLUMN = "harmful_ratio"
# The seeds a grid repeats over (any of them, alone or together): the cells are statistics over
# their values, and the table says which of them varied.
REPEATS = ("seed", "align.seed", "finetune.seed", "finetune.sample_seed")
METRICS = {"HS": "harmful_score", "FA": "finetune_accuracy"}
# described in the CSV only (mean and each seed's value; no interval or test): HS+, how often the
# deployed model refuses task prompts, and the aligned model's HS and refusals (the alignment
# stage's own effect, before any fine-tuning)
DESCRIBED = {
    "HS_plus": "harmful_score_plus",
    "task_refusal": "task_refusal_rate",
    "aligned_HS": "aligned_harmful_score",
    "aligned_task_refusal": "aligned_task_refusal_rate",
}
BASELINE = "sft"  # every other defense is compared with it, prompt by prompt (or --baseline)
# per-prompt outcome behind each metric in generations_deployed.jsonl: (row kind, field, key fields)
OUTCOMES = {
    "HS": ("harmful", "harmful", ("prompt",)),
    "FA": ("task", "correct", ("instruction", "prompt")),
}
FEW_SEEDS = 3  # below this, an interval over seeds is too wide to say much: the table says so


def paired_columns(baseline: str) -> tuple[str, ...]:
    """The paired test's columns, per metric: p-value, pairs, discordant counts each way."""
    return (f"p_vs_{baseline}", "pairs", f"only_{baseline}", "only_defense")


@dataclass
class Point:
    overrides: dict[str, str]
    status: str  # done | failed | missing
    results: dict = field(default_factory=dict)
    error: str = ""
    folder: Path | None = None

    @cached_property
    def deployed_rows(self) -> list[dict]:
        """The deployed model's generations with their verdicts, read once per point."""
        return read_jsonl(self.folder / "generations_deployed.jsonl")


def split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def what_it_computes(overrides) -> dict[str, str]:
    """A point's overrides less those of how it was run (checkpointing, cache_dir, logger, ...:
    NOT_IDENTITY): a grid rerun with `checkpointing.every_n_steps=5` asks for the same points,
    and Hydra rewrites the overrides.yaml of every point it passes with the new command's."""

    def counts(key: str) -> bool:
        bare = key.lstrip("+~")
        return not any(bare == k or bare.startswith(f"{k}.") for k in NOT_IDENTITY)

    return {k: v for k, v in (split(o) for o in overrides) if counts(k)}


def point_id(overrides: dict[str, str]) -> frozenset:
    """A point's overrides as a hashable key, whatever their order."""
    return frozenset(overrides.items())


def expected_grid(sweep_dir: Path) -> list[dict[str, str]]:
    """Every point the sweep directory's multirun commands asked for, in the order first asked:
    the grids kept in .grids/ (one per distinct command, oldest first), then Hydra's
    multirun.yaml (the latest)."""
    kept = sorted((sweep_dir / GRIDS).glob("*.yaml"), key=lambda f: (f.stat().st_mtime_ns, f.name))
    files = kept + (
        [sweep_dir / "multirun.yaml"] if (sweep_dir / "multirun.yaml").is_file() else []
    )
    points: dict[frozenset, dict[str, str]] = {}
    for file in files:
        for point in grid_points(yaml.safe_load(file.read_text())):
            points.setdefault(point_id(point), point)
    return list(points.values())


def grid_points(config: dict) -> list[dict[str, str]]:
    """The points one command's sweeper expanded: `hydra.sweeper.params` (experiment files) +
    command-line overrides."""
    params = config["hydra"].get("sweeper", {}).get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config["hydra"]["overrides"]["task"])
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return [what_it_computes(job) for job in jobs]


def collect(sweep_dir: Path) -> list[Point]:
    """Every expected point with its status; points found on disk but not in the grid are added."""
    found: dict[frozenset, Path] = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        overrides = what_it_computes(yaml.safe_load(overrides_file.read_text()) or [])
        found[point_id(overrides)] = overrides_file.parent.parent
    grid = expected_grid(sweep_dir)
    keys = {point_id(point) for point in grid}
    grid += [dict(key) for key in found if key not in keys]
    points = []
    for overrides in grid:
        folder = found.get(point_id(overrides))
        latest = None if folder is None else latest_outcome(folder)
        if latest == RESULTS:
            points.append(Point(overrides, "done", read_results(folder / RESULTS), folder=folder))
        elif latest == FAILED:
            points.append(
                Point(overrides, "failed", error=json.loads((folder / FAILED).read_text())["error"])
            )
        else:
            points.append(Point(overrides, "missing"))
    return points


def latest_outcome(folder: Path) -> str | None:
    """RESULTS or FAILED, whichever the point's latest attempt wrote (a retry that failed before
    it could clear an older results.json leaves both), or None."""
    written = {name: folder / name for name in (RESULTS, FAILED) if (folder / name).is_file()}
    if not written:
        return None
    return max(written, key=lambda name: (written[name].stat().st_mtime_ns, name == FAILED))


def row_label(point: Point, swept: list[str]) -> str:
    keys = [k for k in swept if k != COLUMN and k not in REPEATS]
    if keys == ["defense"]:
        return point.overrides["defense"]
    if keys:
        return ", ".join(f"{k}={point.overrides.get(k, '')}" for k in keys)
    return point.results.get("defense") or point.overrides.get("defense", "(default)")


def outcomes(point: Point, short: str) -> dict[tuple, bool]:
    """The deployed model's per-prompt outcome behind metric `short` (harmful / correct)."""
    kind, value, keys = OUTCOMES[short]
    return {
        tuple(r.get(k) for k in keys): bool(r[value])
        for r in point.deployed_rows
        if r["kind"] == kind
    }


def paired_test(
    points: list[Point], done: dict[frozenset, Point], short: str, baseline: str = BASELINE
) -> dict | None:
    """McNemar of `points` against the baseline's points with the same other overrides (same
    seed, same ratio), pooled over the pairs (prompt, seed) both have; None without a finished
    baseline point."""
    only_baseline = only_defense = pairs = 0
    for p in points:
        overrides = {**p.overrides, "defense": baseline}
        partner = done.get(point_id(overrides))
        if partner is None or p.status != "done":
            continue
        mine, theirs = outcomes(p, short), outcomes(partner, short)
        for key in mine.keys() & theirs.keys():
            pairs += 1
            only_baseline += theirs[key] and not mine[key]
            only_defense += mine[key] and not theirs[key]
    if pairs == 0:
        return None
    values = (mcnemar_exact(only_baseline, only_defense), pairs, only_baseline, only_defense)
    return dict(zip(paired_columns(baseline), values))


def swept_keys(points: list[Point]) -> list[str]:
    """The overrides whose value differs between points."""
    return sorted(
        {k for p in points for k in p.overrides if len({q.overrides.get(k) for q in points}) > 1}
    )


def summarize(
    points: list[Point], level: float = DEFAULT_LEVEL, baseline: str = BASELINE
) -> list[dict]:
    """One row per (label, harmful_ratio), labels in the grid's order: mean, std and t interval
    over seeds, the paired test against the baseline defense, and the count of each status."""
    swept = swept_keys(points)
    done = {point_id(p.overrides): p for p in points if p.status == "done"}
    cells: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        ratio = p.overrides.get(COLUMN, str(p.results.get(COLUMN, "?")))
        cells.setdefault((row_label(p, swept), ratio), []).append(p)
    rows = []
    for (label, ratio), group in cells.items():
        finished = [p for p in group if p.status == "done"]
        row = {
            "row": label,
            COLUMN: ratio,
            "seeds_done": len(finished),
            "failed": sum(p.status == "failed" for p in group),
            "missing": sum(p.status == "missing" for p in group),
            "interval_level": level,
            "repeats_over": ",".join(k for k in REPEATS if k in swept),
            "baseline": baseline,
        }
        compared = "defense" in swept and group[0].overrides.get("defense") != baseline
        for short, key in METRICS.items():
            values = [p.results[key] for p in finished]
            row[f"{short}_mean"] = statistics.fmean(values) if values else None
            row[f"{short}_std"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{short}_values"] = " ".join(f"{v:g}" for v in values)  # each seed's, in order
            interval = mean_interval(values, level)
            row[f"{short}_ci_low"], row[f"{short}_ci_high"] = interval or (None, None)
            test = (paired_test(finished, done, short, baseline) if compared else None) or {}
            row.update({f"{short}_{c}": test.get(c) for c in paired_columns(baseline)})
        for short, key in DESCRIBED.items():
            values = [p.results[key] for p in finished if p.results.get(key) is not None]
            row[f"{short}_mean"] = statistics.fmean(values) if values else None
            row[f"{short}_values"] = " ".join(f"{v:g}" for v in values)
        row["stage_seconds"] = round(sum(stage_seconds(p) for p in finished), 1)
        row["errors"] = "; ".join(sorted({p.error for p in group if p.error}))
        rows.append(row)
    # rows in the grid's own order (an experiment file lists a paper table's rows in its order)
    order = list(dict.fromkeys(r["row"] for r in rows))  # labels as they first appear
    return sorted(rows, key=lambda r: (order.index(r["row"]), _as_float(r[COLUMN])))


def stage_seconds(point: Point) -> float:
    """What a finished point computed, in seconds: its results' `seconds`, summed (a stage or
    evaluation found in the stage cache is not in them)."""
    return sum(point.results.get("seconds", {}).values())


def median_seconds(points: list[Point], prefix: str) -> str:
    """The median seconds of the stages named `prefix`... over the points that computed one
    (how many in brackets), or "cached" if none did."""
    values = [
        sum(v for k, v in p.results.get("seconds", {}).items() if k.startswith(prefix))
        for p in points
        if any(k.startswith(prefix) for k in p.results.get("seconds", {}))
    ]
    return f"{statistics.median(values):.0f} ({len(values)})" if values else "cached"


def compute_markdown(points: list[Point]) -> list[str]:
    """Per row label: the median seconds of alignment, fine-tuning and the evaluations (over the
    points that computed them), and the stage time all its finished points took."""
    swept = swept_keys(points)
    finished = [p for p in points if p.status == "done"]
    labels = list(dict.fromkeys(row_label(p, swept) for p in finished))
    total = sum(stage_seconds(p) for p in finished) / 3600
    lines = [
        "",
        "## Compute",
        "",
        f"Stage time of the {len(finished)} finished points: {total:.2f} h, the sum of their "
        "results' `seconds` (a stage found in the stage cache is not counted; loading the model "
        "is, process start-up is not). Per defense, the median seconds of each stage over the "
        "points that computed it (how many in brackets; `cached`: none did).",
        "",
        "| defense | points | alignment | fine-tuning | evaluations | stage time (h) |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        mine = [p for p in finished if row_label(p, swept) == label]
        hours = sum(stage_seconds(p) for p in mine) / 3600
        lines.append(
            f"| {label} | {len(mine)} | {median_seconds(mine, 'align')} | "
            f"{median_seconds(mine, 'finetune')} | {median_seconds(mine, 'eval_')} | {hours:.2f} |"
        )
    return lines


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def stars(p: float | None) -> str:
    return "" if p is None else "**" if p < 0.01 else "*" if p < 0.05 else ""


def metric_text(row: dict, short: str) -> str:
    """`53.8 [41.2, 66.4] p=0.031*`: mean over seeds, its interval (clipped to [0, 100]), and
    the paired test against the baseline."""
    mean = row[f"{short}_mean"]
    if mean is None:
        return "–"
    text = f"{mean:.1f}"
    if row[f"{short}_ci_low"] is not None:
        low, high = max(row[f"{short}_ci_low"], 0.0), min(row[f"{short}_ci_high"], 100.0)
        text += f" [{low:.1f}, {high:.1f}]"
    p = row[f"{short}_p_vs_{row['baseline']}"]
    return text + (f" p={p:.2g}{stars(p)}" if p is not None else "")


def cell_text(row: dict) -> str:
    text = f"HS {metric_text(row, 'HS')} / FA {metric_text(row, 'FA')}"
    seeds = row["seeds_done"]
    notes = (
        [
            f"{seeds} seed{'s' if seeds > 1 else ''}"
            + (f" < {FEW_SEEDS}" if seeds < FEW_SEEDS else "")
        ]
        if seeds
        else []
    )
    notes += [f"**{row['failed']} failed**"] if row["failed"] else []
    notes += [f"{row['missing']} missing"] if row["missing"] else []
    if not seeds:
        text = "FAILED" if row["failed"] else "missing"
    return f"{text} ({', '.join(notes)})" if notes else text


def markdown(rows: list[dict], points: list[Point]) -> str:
    ratios = sorted({r[COLUMN] for r in rows}, key=_as_float)
    labels = list(dict.fromkeys(r["row"] for r in rows))
    lookup = {(r["row"], r[COLUMN]): r for r in rows}
    level = f"{100 * rows[0]['interval_level']:g}%"
    lines = [
        f"HS / FA (%): mean over seeds [{level} t interval over seeds, clipped to [0, 100]; none with one "
        f"seed; wide with fewer than {FEW_SEEDS}, marked `< {FEW_SEEDS}`]. p: exact McNemar test of the "
        f"per-prompt outcomes against {rows[0]['baseline']} at the same ratio and seed, pooled over the seeds "
        "both finished (* p < 0.05, ** p < 0.01; not corrected for multiple comparisons). "
        "Lower HS and higher FA are better.",
        "",
        f"Repeats vary: {rows[0]['repeats_over'] or 'nothing (one run per cell)'}.",
        "",
        *split_note(points),
        "| defense | " + " | ".join(f"p = {x}" for x in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for label in labels:
        cells = [cell_text(lookup[(label, x)]) if (label, x) in lookup else "–" for x in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = [f"- {r['row']}, p = {r[COLUMN]}: {r['errors']}" for r in rows if r["errors"]]
    if errors:
        lines += ["", "Failed points:", *errors]
    lines += described_markdown(rows, labels, ratios)
    lines += compute_markdown(points)
    return "\n".join(lines) + "\n"


def described_markdown(rows: list[dict], labels: list[str], ratios: list) -> list[str]:
    """HS+ and the deployed model's task refusals per cell (mean, each seed's value): a low HS
    can be empty or degenerate answers rather than refusals, which HS+ counts."""
    lookup = {(r["row"], r[COLUMN]): r for r in rows}

    def cell(row: dict | None) -> str:
        if row is None or row["HS_plus_mean"] is None:
            return "–"
        text = f"HS+ {row['HS_plus_mean']:.1f} ({row['HS_plus_values'].replace(' ', ', ')})"
        if row["task_refusal_mean"] is not None:
            text += f" / task refusals {row['task_refusal_mean']:.1f}"
        return text

    lines = [
        "",
        "## Beyond HS",
        "",
        "HS+ (%): the harmful prompts answered harmfully or degenerately (empty or repetitive "
        "answers, which HS counts as harmless), mean over seeds (each seed's value); task "
        "refusals (%): the deployed model's refusals of task prompts, mean over seeds. "
        "HS+ well above HS means a defense lowers HS by breaking answers, not by refusing.",
        "",
        "| defense | " + " | ".join(f"p = {x}" for x in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for label in labels:
        lines.append(
            f"| {label} | " + " | ".join(cell(lookup.get((label, x))) for x in ratios) + " |"
        )
    return lines


def split_note(points: list[Point]) -> list[str]:
    """A line saying so when finished points were evaluated on the validation split (tuning
    runs): their scores are not the test split's."""
    done = [p for p in points if p.status == "done"]
    validation = sum(p.results.get("eval_split") == "validation" for p in done)
    if not validation:
        return []
    return [
        f"**Evaluated on the validation split** (the prompts and task examples a hyperparameter "
        f"is tuned on, not the test split): {validation} of the {len(done)} finished points.",
        "",
    ]


def error_bars(rows: list[dict], short: str) -> list[list[float]]:
    """Asymmetric error bars: from the mean to each end of its interval (0 without one)."""
    below = [
        r[f"{short}_mean"] - r[f"{short}_ci_low"] if r[f"{short}_ci_low"] is not None else 0.0
        for r in rows
    ]
    above = [
        r[f"{short}_ci_high"] - r[f"{short}_mean"] if r[f"{short}_ci_high"] is not None else 0.0
        for r in rows
    ]
    return [below, above]


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
                yerr=error_bars(mine, short),
                marker="o",
                capsize=3,
                label=label,
            )
        level = f"{100 * rows[0]['interval_level']:g}%"
        ax.set(
            xlabel="harmful ratio p",
            ylabel=f"{short} (%)",
            title=f"{short} vs harmful ratio ({level} t intervals)",
        )
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


def report(
    sweep_dir: Path,
    out: Path | None = None,
    level: float = DEFAULT_LEVEL,
    baseline: str | None = None,
) -> list[dict]:
    """Checks everything before writing anything: a bad level, a missing directory, a sweep with
    no finished point, a baseline (given, not the default) with no finished point each stop
    with one message and no file written."""
    sweep_dir = Path(sweep_dir)
    try:
        check_level(level, key="--level")
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    if not sweep_dir.is_dir():
        raise SystemExit(
            f"error: no sweep directory {sweep_dir}; pass the multirun/<sweep_name> directory"
        )
    out = Path(out or sweep_dir)
    points = collect(sweep_dir)
    if not points:
        raise SystemExit(
            f"error: {sweep_dir} holds no grid points (no multirun.yaml, no */.hydra/overrides.yaml)"
        )
    if not any(p.status == "done" for p in points):
        failed = sum(p.status == "failed" for p in points)
        raise SystemExit(
            f"error: no point of {sweep_dir} has finished ({failed} failed, {len(points) - failed} "
            "missing): nothing to report yet; see the points' failed.json, or run the grid again"
        )
    if baseline is not None:
        check_baseline(baseline, points, sweep_dir)
    rows = summarize(points, level, baseline or BASELINE)
    atomic_write_text(out / "table.md", markdown(rows, points))
    write_csv(out / "table.csv", rows)
    plot(rows, out)
    return rows


def check_baseline(baseline: str, points: list[Point], sweep_dir: Path) -> None:
    defenses = sorted({p.overrides.get("defense", "") for p in points if p.status == "done"} - {""})
    if baseline not in defenses:
        raise SystemExit(
            f"error: --baseline {baseline}: no finished point of {sweep_dir} has defense={baseline}; "
            f"pass one of: {', '.join(defenses) or '(none: no point sets defense=)'}"
        )


def main() -> None:
    parser = report_parser(__doc__)
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"the defense every other row is tested against (default: {BASELINE})",
    )
    args = parser.parse_args()
    report(args.sweep_dir, args.out, args.level, args.baseline)
    print((Path(args.out or args.sweep_dir) / "table.md").read_text())


if __name__ == "__main__":
    main()
