"""Re-judging saved generations with another judge, and the judges' agreement report
(evaluation/rejudge.py)."""

import json

import pytest

from helpers.configs import run_tiny


# --- re-judging saved generations, agreement --------------------------------------------------------
@pytest.mark.e2e
def test_rejudge_saved_generations_and_agreement(tmp_path):
    from evaluation import rejudge
    from plumbing.io import read_jsonl

    run_dir = tmp_path / "run"
    proc = run_tiny(tmp_path, "defense=sft", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = json.loads((run_dir / "results.json").read_text())
    rejudge.main([str(run_dir), "judge=keyword"])

    results = json.loads((run_dir / "results.json").read_text())
    assert results["judge"] == "refusal" and set(results["judges"]) == {"keyword"}
    assert results["harmful_score"] == before["harmful_score"]  # the run's own numbers are kept
    judged = read_jsonl(run_dir / "judged" / "keyword" / "generations_deployed.jsonl")
    harmful = [r for r in judged if r["kind"] == "harmful"]
    assert results["judges"]["keyword"]["deployed"]["harmful_score"] == pytest.approx(
        100 * sum(r["harmful"] for r in harmful) / len(harmful)
    )
    # agreement, recomputed here from the two files
    own = {
        r["prompt"]: r["harmful"]
        for r in read_jsonl(run_dir / "generations_deployed.jsonl")
        if r["kind"] == "harmful"
    }
    other = {r["prompt"]: r["harmful"] for r in harmful}
    expected = sum(own[p] == other[p] for p in own) / len(own)
    report = json.loads((run_dir / "judge_agreement.json").read_text())
    row = report["generations_deployed.jsonl"][0]
    assert {row["judge_a"], row["judge_b"]} == {"refusal", "keyword"}
    assert row["agreement"] == pytest.approx(expected) and row["prompts"] == len(own)
    assert (
        "generations_deployed.jsonl | keyword | refusal"
        in (run_dir / "judge_agreement.md").read_text()
    )


def test_agreement_of_hand_made_decisions():
    from evaluation.rejudge import agreement

    rows = agreement(
        {
            "a": {"p1": True, "p2": False, "p3": True, "p4": False},
            "b": {"p1": True, "p2": True, "p3": False, "p4": False, "p5": True},
        }
    )
    assert rows == [
        {
            "judge_a": "a",
            "judge_b": "b",
            "prompts": 4,
            "agreement": 0.5,
            "harmful_by_both": 1,
            "harmful_only_a": 1,
            "harmful_only_b": 1,
        }
    ]
