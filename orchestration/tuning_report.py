"""A tuning study's trials as a table and a figure: each trial's values with their t interval
over its repeats, the Pareto front and the picked trial, read from the tuning.json that
`hydra/sweeper=optuna` (hydra_plugins/hfd_optuna_sweeper) writes.

    python -m orchestration.tuning_report multirun/<sweep_name> [--out DIR] [--level 0.95]

Writes tuning.md (the table, the pick rule and the compute), tuning.png (with one searched
numeric value: each objective against it, every repeat a dot; with two objectives: their plane,
the Pareto front marked) and a copy of tuning.json, to the sweep directory by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evaluation.results import RESULTS, read_results
from evaluation.statistics import DEFAULT_LEVEL, check_level, mean_interval
from orchestration.report_cli import report_parser
from plumbing.errors import InputError
from plumbing.figures import new_figure, plain_log_x, save_figure
from plumbing.io import atomic_write_text

TUNING = "tuning.json"
SHORT = {"harmful_score": "HS", "finetune_accuracy": "FA"}  # the table's names for metrics
# metrics that are percentages: their intervals are clipped to [0, 100] in the table and figure
PERCENT = ("harmful_score", "harmful_score_plus", "finetune_accuracy", "task_refusal_rate")
# shown beside the objectives, read from each repeat's results.json: HS counts empty answers as
# harmless and HS+ counts them, so a trial whose low HS is broken answers shows here
DESCRIBED = {"harmful_score_plus": "HS+"}


def load_study(sweep_dir: Path) -> tuple[dict, str]:
    """tuning.json and its text (the copy written is the one reported, though the sweeper
    rewrites the file while a study runs), checked to hold at least one finished trial (else
    one message, nothing written)."""
    path = Path(sweep_dir) / TUNING
    if not path.is_file():
        raise InputError(
            f"no {TUNING} in {sweep_dir}: pass the sweep directory of a study run with "
            "hydra/sweeper=optuna (e.g. multirun/tune_panacea_rho); the sweeper writes it after "
            "each batch of trials, so a study still in its first trials has none yet"
        )
    text = path.read_text()
    study = json.loads(text)
    if not any(t["state"] == "COMPLETE" for t in study["trials"]):
        raise InputError(
            f"no trial of the study in {sweep_dir} has finished: nothing to report yet; see its "
            "points' failed.json, or run the study's command again"
        )
    return study, text


def finished_points(sweep_dir: Path) -> list[tuple[dict[str, str], dict]]:
    """Every finished point in the sweep directory: its command-line overrides and results."""
    points = []
    for path in Path(sweep_dir).glob(f"*/{RESULTS}"):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        try:
            results = read_results(path)
        except ValueError as err:  # pydantic's ValidationError is one
            raise InputError(f"{path} is not a valid results file: {err}") from None
        pairs = (o.partition("=") for o in yaml.safe_load(overrides_file.read_text()) or [])
        points.append(({k: v for k, _, v in pairs}, results))
    return points


def repeat_results(trial: dict, objectives: list[str], points: list) -> list[dict | None]:
    """The results of each of the trial's runs, in its repeats' order (None where no single
    point matches): a point whose overrides hold the trial's values (as the sweeper writes
    them, `key=value`) and the repeat's own overrides, and whose objectives are the values the
    study recorded for that run (another point with more overrides, say a rerun on the test
    split, is not taken for it)."""
    repeats = (trial.get("repeats") or {}).get("overrides") or [[]]
    recorded = (trial.get("repeats") or {}).get("values") or [trial["values"]]
    found = []
    for repeat, values in zip(repeats, recorded, strict=False):
        wanted = {k: str(v) for k, v in trial["params"].items()}
        wanted.update(o.partition("=")[::2] for o in repeat)
        matches = [
            r
            for o, r in points
            if all(o.get(k) == v for k, v in wanted.items())
            and [r.get(m) for m in objectives] == list(values)
        ]
        found.append(matches[0] if len(matches) == 1 else None)
    return found


def described_metrics(objectives) -> list[str]:
    """HS+ beside HS (not when HS is not tuned, or HS+ is itself an objective)."""
    if "harmful_score" not in objectives:
        return []
    return [m for m in DESCRIBED if m not in objectives]


def trial_rows(study: dict, level: float, points: list | None = None) -> list[dict]:
    """One row per trial: its params, and per objective the mean (the study's value), the t
    interval over its repeats and each repeat's value; per described metric (HS+), its
    repeats' values from their results.json."""
    objectives = list(study["objectives"])
    front = {t["number"] for t in study["best"]}
    picked = (study.get("picked") or {}).get("number")
    rows = []
    for trial in study["trials"]:
        row = {"number": trial["number"], "params": trial["params"], "state": trial["state"]}
        row["retry_of"] = trial.get("retry_of")  # a killed trial's values, asked again
        row["pareto"], row["picked"] = trial["number"] in front, trial["number"] == picked
        per_repeat = (trial.get("repeats") or {}).get("values") or (
            [trial["values"]] if trial["values"] else []
        )
        for i, metric in enumerate(objectives):
            values = [repeat[i] for repeat in per_repeat]
            row[metric] = {
                "mean": trial["values"][i] if trial["values"] else None,
                "interval": mean_interval(values, level) if values else None,
                "values": values,
            }
        complete_trial = trial["state"] == "COMPLETE"
        runs = repeat_results(trial, objectives, points or []) if complete_trial else []
        for metric in described_metrics(objectives):
            values = [r[metric] for r in runs if r is not None and r.get(metric) is not None]
            complete = bool(runs) and len(values) == len(runs)  # every run found, or nothing
            row[metric] = {
                "mean": sum(values) / len(values) if complete else None,
                "interval": mean_interval(values, level) if complete else None,
                "values": values if complete else [],
            }
        rows.append(row)
    return sorted(rows, key=sort_key)


def sort_key(row: dict):
    """Finished trials first, by their searched values (numbers in order, then the rest as
    text), then the trial number."""
    values = tuple(
        (0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in row["params"].values()
    )
    return (row["state"] != "COMPLETE", values, row["number"])


def value_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def shown_interval(metric: str, interval: list[float]) -> list[float]:
    """The interval as shown: clipped to [0, 100] for a percentage."""
    if metric not in PERCENT:
        return interval
    return [max(interval[0], 0.0), min(interval[1], 100.0)]


def metric_text(metric: str, cell: dict) -> str:
    """`53.8 [41.2, 66.4] (59, 10, 44.5)`: the mean, its interval (clipped for a percentage),
    each repeat's value."""
    if cell["mean"] is None:
        return "–"
    text = f"{cell['mean']:.1f}"
    if cell["interval"] is not None:
        low, high = shown_interval(metric, cell["interval"])
        text += f" [{low:.1f}, {high:.1f}]"
    if len(cell["values"]) > 1:
        text += " (" + ", ".join(f"{v:.3g}" for v in cell["values"]) + ")"
    return text


def markdown(study: dict, rows: list[dict], level: float, points: list) -> str:
    objectives = study["objectives"]
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    finished = sum(r["state"] == "COMPLETE" for r in rows)
    hours = sum(sum(r.get("seconds", {}).values()) for _, r in points) / 3600
    described = described_metrics(objectives)
    about_described = (
        " HS+ (described, not an objective: read from the trial's run directories; – when a "
        "run's directory is not found): HS counts empty and repetitive answers as harmless and "
        "HS+ counts them, so HS+ well above HS means the trial lowers HS by breaking answers, "
        "not by refusing."
        if described
        else ""
    )
    lines = [
        f"# Tuning study `{study['study_name']}`",
        "",
        f"Finished trials: {finished} of {len(rows)} asked"
        + (
            f" ({len(rows) - finished} did not finish: see the table)"
            if finished < len(rows)
            else ""
        )
        + ". Objectives: "
        + ", ".join(f"{SHORT.get(m, m)} ({m}, {d})" for m, d in objectives.items())
        + f". Each value: the mean over the trial's repeats, its {100 * level:g}% t interval "
        "over them (clipped to [0, 100] for a percentage) and each repeat's value in "
        f"parentheses. {front_name(objectives)}: {front_meaning(objectives)}." + about_described,
        "",
    ]
    if "pick" in study:
        picked = study.get("picked")
        lines += [
            f"Pick rule, fixed before the study ran: `{json.dumps(study['pick'])}`. Picked: "
            + (
                "none (no trial within every margin)"
                if picked is None
                else f"trial {picked['number']}, "
                + ", ".join(f"`{k}={v!r}`" for k, v in picked["params"].items())
            )
            + ".",
            "",
        ]
    header = [
        "trial",
        *params,
        *(SHORT.get(m, m) for m in objectives),
        *(DESCRIBED[m] for m in described),
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        marks = ["picked"] * row["picked"] + [front_name(objectives)] * row["pareto"]
        if row["state"] != "COMPLETE":
            marks.append(row["state"].lower())
        if row["retry_of"] is not None:
            marks.append(f"retry of trial {row['retry_of']}")
        cells = [
            str(row["number"]),
            *(value_text(row["params"].get(k, "–")) for k in params),
            *(metric_text(m, row[m]) for m in objectives),
            *(metric_text(m, row[m]) for m in described),
            ", ".join(marks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Compute: the sweep directory's {len(points)} finished points, {hours:.2f} h of stage "
        "time, the sum of their results' `seconds` (stages found in the stage cache are not "
        "counted).",
    ]
    return "\n".join(lines) + "\n"


def front_name(objectives: dict) -> str:
    return "Pareto" if len(objectives) > 1 else "best"


def front_meaning(objectives: dict) -> str:
    if len(objectives) > 1:
        return "on the study's Pareto front"
    return "the study's best trial"


def log_scale(sweep_dir: Path, param: str) -> bool:
    """Whether the study searched `param` on a log scale (its search space in multirun.yaml)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return False
    space = (yaml.safe_load(path.read_text())["hydra"].get("sweeper") or {}).get("search_space")
    return bool(((space or {}).get(param) or {}).get("log"))


def plot(study: dict, rows: list[dict], out: Path, sweep_dir: Path) -> bool:
    """tuning.png; False (no figure) when there is neither one numeric searched value nor a
    plane of two objectives to draw."""
    objectives = list(study["objectives"])
    done = [r for r in rows if r["state"] == "COMPLETE"]
    params = list(dict.fromkeys(k for r in done for k in r["params"]))
    one_value = len(params) == 1 and all(
        isinstance(r["params"][params[0]], int | float) for r in done
    )
    panels = (len(objectives) if one_value else 0) + (len(objectives) == 2)
    if not panels:
        return False
    fig, axes = new_figure(width=4.0 * panels, height=3.5, ncols=panels)
    axes = list(axes[0])
    if one_value:
        param = params[0]
        for ax, metric in zip(axes, objectives, strict=False):
            for r in done:
                x = r["params"][param]
                ax.scatter([x] * len(r[metric]["values"]), r[metric]["values"], s=10, c="0.6")
                low, high = shown_interval(metric, r[metric]["interval"] or [r[metric]["mean"]] * 2)
                ax.errorbar(
                    x,
                    r[metric]["mean"],
                    yerr=[[r[metric]["mean"] - low], [high - r[metric]["mean"]]],
                    fmt="*" if r["picked"] else "o",
                    ms=12 if r["picked"] else 5,
                    c="tab:red" if r["picked"] else "tab:blue",
                    capsize=3,
                )
            if log_scale(sweep_dir, param):
                plain_log_x(ax)
            ax.set(xlabel=param, ylabel=f"{SHORT.get(metric, metric)} (%)")
            ax.set_title(f"{SHORT.get(metric, metric)} per trial (dots: repeats)", fontsize=9)
    if len(objectives) == 2:
        ax = axes[-1]
        x_metric, y_metric = objectives[1], objectives[0]
        for r in done:
            ax.scatter(
                r[x_metric]["mean"],
                r[y_metric]["mean"],
                marker="*" if r["picked"] else "o",
                s=120 if r["picked"] else 30,
                c="tab:red" if r["picked"] else "tab:blue" if r["pareto"] else "0.6",
            )
            ax.annotate(str(r["number"]), (r[x_metric]["mean"], r[y_metric]["mean"]), fontsize=7)
        ax.set(
            xlabel=f"{SHORT.get(x_metric, x_metric)} (%)",
            ylabel=f"{SHORT.get(y_metric, y_metric)} (%)",
        )
        ax.set_title("trial means (blue: Pareto front, star: picked)", fontsize=9)
    save_figure(fig, out / "tuning.png")
    return True


def report(sweep_dir: Path, out: Path | None = None, level: float = DEFAULT_LEVEL) -> list[dict]:
    """Checks the level and the study before writing anything."""
    check_level(level, key="--level")
    sweep_dir = Path(sweep_dir)
    study, text = load_study(sweep_dir)
    out = Path(out or sweep_dir)
    points = finished_points(sweep_dir)
    rows = trial_rows(study, level, points)
    atomic_write_text(out / "tuning.md", markdown(study, rows, level, points))
    if not plot(study, rows, out, sweep_dir):
        (out / "tuning.png").unlink(missing_ok=True)  # a stale figure would not match the table
    if out.resolve() != sweep_dir.resolve():
        atomic_write_text(out / TUNING, text)
    return rows


def main() -> None:
    args = report_parser(__doc__).parse_args()
    try:
        report(args.sweep_dir, args.out, args.level)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    print((Path(args.out or args.sweep_dir) / "tuning.md").read_text())


if __name__ == "__main__":
    main()
