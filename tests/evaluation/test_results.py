"""results.json's one schema (evaluation/results.py)."""

import json

import pytest
from pydantic import ValidationError

from evaluation.results import read_results, validate_results, write_results

METRICS = {
    "harmful_score": 12.5,
    "harmful_score_plus": 25.0,
    "task_refusal_rate": 0.0,
    "n_eval_prompts": 8,
    "judge": "refusal",
    "finetune_accuracy": 90.0,
    "n_task_eval": 10,
}
VALID = {
    "defense": "sft",
    "defense_parts": {"align": "CausalLMModule", "finetune": "CausalLMModule", "post": None},
    "harmful_ratio": 0.1,
    "seed": 0,
    "model": "tiny-llama",
    "task": "sentiment",
    "stages": ["align", "eval"],
    "checkpoint": None,
    "n": 20,
    "n_harmful": 2,
    "n_benign": 18,
    "n_align": 16,
    "n_retain": 4,
    "n_defender": 100,
    "n_user_harmful_pool": 77,
    "seconds": {"align": 1.5},
    "run_dir": "/tmp/x",
    "point_key": "abc",
    "processes": 1,
    **METRICS,
    **{f"aligned_{k}": v for k, v in METRICS.items()},
}


def test_a_valid_record_round_trips(tmp_path):
    written = write_results(tmp_path / "results.json", VALID)
    assert written == VALID and read_results(tmp_path / "results.json") == VALID
    assert json.loads((tmp_path / "results.json").read_text()) == VALID


@pytest.mark.parametrize(
    "change,field",
    [
        ({"harmfull_score": 1.0}, "harmfull_score"),  # a typo is not a silent extra
        ({"harmful_score": "high"}, "harmful_score"),  # a wrong type
        ({"before_post_finetune_accuracy": "x"}, "before_post_finetune_accuracy"),
        (
            {"judges": {"keyword": {"deployed": {"harmful_score": 1.0}}}},
            "judges",
        ),  # incomplete re-judged metrics
    ],
)
def test_bad_records_are_refused_naming_the_field(change, field):
    with pytest.raises(ValidationError, match=field):
        validate_results({**VALID, **change})


def test_a_missing_required_field_is_refused():
    with pytest.raises(ValidationError, match="finetune_accuracy"):
        validate_results({k: v for k, v in VALID.items() if k != "finetune_accuracy"})
