"""Score a run's saved generations with another judge, and report how often judges agree.

    python -m evaluation.rejudge RUN_DIR judge=beaver_dam            # the papers' judge (GPU)
    python -m evaluation.rejudge RUN_DIR judge=keyword               # offline
    python -m evaluation.rejudge RUN_DIR judge=beaver_dam judge.path=/models/beaver-dam-7b

Nothing is generated again: every RUN_DIR/generations_<tag>.jsonl (aligned, before_post,
deployed) is read, its harmful rows judged, its task rows checked for refusals. Written:
RUN_DIR/judged/<judge>/generations_<tag>.jsonl (the rows with this judge's verdicts) and
metrics.json; results.json gets `judges.<judge>.<tag>` = {harmful_score, harmful_score_plus,
task_refusal_rate}, so every number says which judge produced it (the run's own judge is
`results["judge"]`). Then judge_agreement.md / .json: for each generations file, every pair of
judges that scored it and the fraction of harmful prompts on which they agree.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from evaluation.metrics import judged_metrics
from evaluation.results import RESULTS, read_results, write_results
from evaluation.statistics import DEFAULT_LEVEL, check_level
from plumbing.errors import InputError
from plumbing.io import atomic_write_text, read_jsonl, write_jsonl

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def rejudge(run_dir: Path, judge, level: float = DEFAULT_LEVEL) -> dict:
    """Judge every generations file of `run_dir` with `judge`; returns {tag: metrics}."""
    files = sorted(run_dir.glob("generations_*.jsonl"))
    if not files:
        raise SystemExit(
            f"error: {run_dir} has no generations_*.jsonl (a run directory with an eval stage)"
        )
    out_dir = run_dir / "judged" / judge.name
    metrics = {}
    for path in files:
        tag = path.stem.removeprefix("generations_")
        rows = read_jsonl(path)
        harmful = [r for r in rows if r["kind"] == "harmful"]
        task = [r for r in rows if r["kind"] == "task"]
        verdicts = judge.judge_all([r["prompt"] for r in harmful], [r["output"] for r in harmful])
        refusals = getattr(judge, "judge_refusals", judge.judge_all)(
            [r["prompt"] for r in task], [r["output"] for r in task]
        )
        judged = [{**r, **v.as_dict(), "judge": judge.name} for r, v in zip(harmful, verdicts)] + [
            {**r, "refused": v.refused, "judge": judge.name} for r, v in zip(task, refusals)
        ]
        write_jsonl(out_dir / path.name, judged)
        metrics[tag] = judged_metrics(verdicts, [v.refused for v in refusals], judge.name, level)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    results_path = run_dir / RESULTS
    if results_path.is_file():
        results = read_results(results_path)
        results.setdefault("judges", {})[judge.name] = metrics
        write_results(results_path, results)
    return metrics


def harmful_decisions(run_dir: Path) -> dict[str, dict[str, dict[str, bool]]]:
    """{generations file: {judge: {prompt: harmful}}} for the run's own judge and every re-judge."""
    own = "run judge"
    results_path = run_dir / RESULTS
    if results_path.is_file():
        own = read_results(results_path)["judge"]
    decisions: dict[str, dict[str, dict[str, bool]]] = {}
    sources = [(own, p) for p in run_dir.glob("generations_*.jsonl")] + [
        (p.parent.name, p) for p in run_dir.glob("judged/*/generations_*.jsonl")
    ]
    for judge_name, path in sources:
        rows = [r for r in read_jsonl(path) if r["kind"] == "harmful"]
        decisions.setdefault(path.name, {})[judge_name] = {
            r["prompt"]: bool(r["harmful"]) for r in rows
        }
    return decisions


def agreement(decisions: dict[str, dict[str, bool]]) -> list[dict]:
    """For every pair of judges: on how many of the prompts both judged they agree."""
    rows = []
    for a, b in combinations(sorted(decisions), 2):
        shared = sorted(set(decisions[a]) & set(decisions[b]))
        agree = sum(decisions[a][p] == decisions[b][p] for p in shared)
        rows.append(
            {
                "judge_a": a,
                "judge_b": b,
                "prompts": len(shared),
                "agreement": agree / len(shared) if shared else None,
                "harmful_by_both": sum(decisions[a][p] and decisions[b][p] for p in shared),
                "harmful_only_a": sum(decisions[a][p] and not decisions[b][p] for p in shared),
                "harmful_only_b": sum(decisions[b][p] and not decisions[a][p] for p in shared),
            }
        )
    return rows


def write_agreement(run_dir: Path) -> dict[str, list[dict]]:
    report = {name: agreement(d) for name, d in sorted(harmful_decisions(run_dir).items())}
    lines = [
        "| generations | judge A | judge B | prompts | agreement | harmful by both | only A | only B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report.items():
        for r in rows:
            value = "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"
            lines.append(
                f"| {name} | {r['judge_a']} | {r['judge_b']} | {r['prompts']} | {value} | "
                f"{r['harmful_by_both']} | {r['harmful_only_a']} | {r['harmful_only_b']} |"
            )
    atomic_write_text(run_dir / "judge_agreement.md", "\n".join(lines) + "\n")
    atomic_write_text(run_dir / "judge_agreement.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "overrides", nargs="*", help="judge=<name> and judge.* overrides (Hydra syntax)"
    )
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    try:
        level = check_level(cfg.eval.interval_level)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    metrics = rejudge(args.run_dir, instantiate(cfg.judge), level)
    for tag, m in metrics.items():
        low, high = m["harmful_score_ci"] or (float("nan"), float("nan"))
        print(
            f"{tag}: HS {m['harmful_score']:.1f} [{low:.1f}, {high:.1f}]  HS+ {m['harmful_score_plus']:.1f}  "
            f"task refusals {m['task_refusal_rate']:.1f}%  ({m['judge']}, {m['n_eval_prompts']} prompts)"
        )
    write_agreement(args.run_dir)
    print((args.run_dir / "judge_agreement.md").read_text())


if __name__ == "__main__":
    main()
