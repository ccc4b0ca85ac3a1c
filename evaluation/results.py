"""The schema of results.json, the one record of a run: every writer (the run, re-judging) and
every reader (the summary, the tracker, the sweep and its report, re-judging) goes through
`write_results` / `read_results`, which validate it against `RunResults` (pydantic; an unknown
or mistyped field is an error, not a silent extra).

Evaluated model states: the deployed model's metrics are top-level fields; `aligned_*` (the
aligned model) and `before_post_*` (the fine-tuned model before a post transform) carry the same
metrics for the other states when they were evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, create_model

from plumbing.io import atomic_write_text

RESULTS = "results.json"
STATE_PREFIXES = ("aligned_", "before_post_")  # the deployed model's metrics have no prefix


class JudgedMetrics(BaseModel):
    """What a judge decides (evaluation/metrics.py `judged_metrics`); also the re-judged metrics."""

    model_config = ConfigDict(extra="forbid")
    harmful_score: float  # HS (%): harmful prompts answered harmfully
    harmful_score_plus: float  # HS+ (%): harmful or degenerate
    task_refusal_rate: float  # % of benign task prompts refused
    # [low, high] (%) Wilson intervals over prompts at `interval_level` (absent in older files)
    harmful_score_ci: list[float] | None = None
    harmful_score_plus_ci: list[float] | None = None
    task_refusal_rate_ci: list[float] | None = None
    interval_level: float | None = None
    n_eval_prompts: int
    judge: str


class SourceScore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    harmful_score: float
    harmful_score_ci: list[float] | None
    n_eval_prompts: int


class EvalMetrics(JudgedMetrics):
    finetune_accuracy: float  # FA (%)
    finetune_accuracy_ci: list[float] | None = None
    harmful_score_by_source: dict[str, SourceScore] | None = None  # HS of each held-out source
    n_task_eval: int
    # test | validation (datamodules/evaluation.py); absent in older files, which are all test
    eval_split: str | None = None


class RunInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    defense: str
    defense_parts: dict[str, str | None]  # the class of each stage's part (align, finetune, post)
    harmful_ratio: float
    seed: int
    model: str
    task: str
    data: str | None = None  # the harmful data's config name (conf/data/: offline, beavertails)
    stages: list[str]
    checkpoint: str | None
    n: int  # the user's set: n samples, n_harmful of them harmful
    n_harmful: int
    n_benign: int
    n_align: int
    n_retain: int
    n_defender: int
    n_user_harmful_pool: int
    # each training stage's resolved config (the defense part's hyperparameters, optimizer,
    # max_grad_norm, batch size, epochs, seeds) and the post transform's: every value the run used
    stage_config: dict | None = None
    finetune_adapter: str | None = None  # continue | new (conf/config.yaml finetune.adapter)
    aligned_adapter: str | None = None
    aligned_reused: bool | None = None
    align_diagnostics: dict | None = None  # callbacks/diagnostics.py summaries
    finetune_diagnostics: dict | None = None
    post_summary: dict | None = (
        None  # what the post transform reports (e.g. Antidote's pruned fraction)
    )
    seconds: dict[str, float]  # wall time per stage / evaluation (the part this process ran)
    finetuned_adapter_cached: str | None = None  # the fine-tuning stage's cache entry
    reused: list[str] | None = None  # stages / evaluations found finished in the stage cache
    resumed: dict[str, str] | None = None  # stage -> the checkpoint it resumed from
    run_dir: str
    point_key: str  # the resolved config's hash (orchestration/sweep.py)
    processes: int
    environment: dict[str, str | int | None] | None = (
        None  # hardware, library versions (plumbing/environment.py)
    )
    judges: dict[
        str, dict[str, JudgedMetrics]
    ] = {}  # re-judging: judge -> generations tag -> metrics


def _optional(model: type[BaseModel], prefix: str) -> dict:
    return {
        f"{prefix}{name}": (field.annotation | None, None)
        for name, field in model.model_fields.items()
    }


RunResults = create_model(
    "RunResults",
    __base__=(RunInfo,),
    **{
        name: (field.annotation, ... if field.is_required() else field.default)
        for name, field in EvalMetrics.model_fields.items()
    },
    **{k: v for prefix in STATE_PREFIXES for k, v in _optional(EvalMetrics, prefix).items()},
)


def validate_results(results: dict) -> dict:
    """`results` checked against the schema (pydantic.ValidationError names each bad field)."""
    return RunResults.model_validate(results).model_dump(mode="json", exclude_unset=True)


def write_results(path: Path, results: dict) -> dict:
    checked = validate_results(results)
    atomic_write_text(Path(path), json.dumps(checked, indent=2) + "\n")
    return checked


def read_results(path: Path) -> dict:
    return validate_results(json.loads(Path(path).read_text()))
