"""A results.json as a run writes it (every field the schema requires), for report tests that
build a sweep directory by hand."""

from pathlib import Path

import yaml

from evaluation.results import write_results


def write_point(folder: Path, overrides: list[str], **fields) -> None:
    """A finished point: .hydra/overrides.yaml and a valid results.json with `fields` over
    the defaults below."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {
        "defense": "sft",
        "defense_parts": {"align": "A", "finetune": "F", "post": None},
        "harmful_ratio": 0.2,
        "seed": 0,
        "model": "tiny",
        "task": "sentiment",
        "stages": ["align", "finetune", "post", "eval"],
        "checkpoint": None,
        "n": 20,
        "n_harmful": 4,
        "n_benign": 16,
        "n_align": 16,
        "n_retain": 4,
        "n_defender": 100,
        "n_user_harmful_pool": 77,
        "seconds": {},
        "run_dir": str(folder),
        "point_key": "k",
        "processes": 1,
        "harmful_score": 0.0,
        "harmful_score_plus": 0.0,
        "task_refusal_rate": 0.0,
        "n_eval_prompts": 10,
        "judge": "refusal",
        "finetune_accuracy": 0.0,
        "n_task_eval": 4,
    }
    write_results(folder / "results.json", {**results, **fields})
