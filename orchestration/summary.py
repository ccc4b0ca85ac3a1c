"""The end-of-run summary printed to the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(value, interval=None) -> str:
    """`67.5 [52.0, 80.0]`: the value and its interval over prompts, when there is one."""
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")


def print_summary(results: dict) -> None:
    table = Table(
        title=f"{results['defense']} | harmful_ratio={results['harmful_ratio']} | "
        f"seed={results['seed']} | {results['model']} | task={results['task']}"
    )
    table.add_column("model state")
    table.add_column("HS (%) lower=better", justify="right")
    table.add_column("HS+ (%)", justify="right")
    table.add_column("FA (%) higher=better", justify="right")
    table.add_column("task refusals (%)", justify="right")
    for label, prefix in (
        ("aligned (before fine-tuning)", "aligned_"),
        ("fine-tuned, before the post transform", "before_post_"),
        ("deployed", ""),
    ):
        if f"{prefix}harmful_score" in results:
            table.add_row(
                label,
                *(
                    _fmt(results.get(f"{prefix}{k}"), results.get(f"{prefix}{k}_ci"))
                    for k in (
                        "harmful_score",
                        "harmful_score_plus",
                        "finetune_accuracy",
                        "task_refusal_rate",
                    )
                ),
            )
    console = Console()
    console.print(table)
    level = results.get("interval_level")
    if level:
        console.print(
            f"[brackets]: {100 * level:g}% Wilson intervals over the prompts (one run; seeds vary more)",
            markup=False,
        )
    console.print(
        f"samples: user set n={results['n']} (harmful {results['n_harmful']}, benign {results['n_benign']}); "
        f"alignment {results['n_align']}; defender-held harmful {results['n_defender']}; "
        f"eval: {results.get('n_eval_prompts', '-')} harmful prompts, {results.get('n_task_eval', '-')} task examples"
        + (" (validation split)" if results.get("eval_split") == "validation" else "")
    )
    if results.get("aligned_adapter"):
        how = "reused from cache" if results.get("aligned_reused") else "trained and cached"
        console.print(f"aligned adapter ({how}): {results['aligned_adapter']}")
    console.print(f"stage seconds: {results['seconds']}")
    console.print(f"results written to: {results['run_dir']}")
