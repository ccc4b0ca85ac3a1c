"""End-to-end runs of run.py's stages on the tiny model: results, cache reuse and atomicity,
stage selection, and bad input rejected before any training."""

import json
import logging
import subprocess
import sys

import pytest

import orchestration.stages as run_module
from plumbing.errors import InputError
from conftest import ROOT

REQUIRED = {"harmful_score", "finetune_accuracy", "aligned_harmful_score", "aligned_finetune_accuracy",
            "defense", "harmful_ratio", "seed", "model", "n_harmful", "n_benign"}


def cache_entries(tmp_path, stage="align"):
    folder = tmp_path / "cache" / stage
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_full_run_writes_results_and_generations(tiny_cfg, tmp_path):
    results = run_module.run(tiny_cfg("harmful_ratio=0.25"), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert REQUIRED <= set(saved) and saved == json.loads(json.dumps(results))
    assert (saved["n_harmful"], saved["n_benign"]) == (5, 15)
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations_deployed.jsonl").open()]
    harmful_rows = [r for r in rows if r["kind"] == "harmful"]
    assert len(harmful_rows) == saved["n_eval_prompts"] == 6
    assert saved["harmful_score"] == pytest.approx(100 * sum(r["harmful"] for r in harmful_rows) / 6)
    task_rows = [r for r in rows if r["kind"] == "task"]
    assert saved["finetune_accuracy"] == pytest.approx(100 * sum(r["correct"] for r in task_rows) / 6)
    assert saved["task_refusal_rate"] == pytest.approx(100 * sum(r["refused"] for r in task_rows) / 6)
    assert (tmp_path / "run" / "generations_aligned.jsonl").is_file()
    assert (tmp_path / "run" / "adapters" / "deployed.safetensors").is_file()


def test_aligned_model_is_reused_across_ratio_defense_stage_and_seed(tiny_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="run")
    first = run_module.run(tiny_cfg("harmful_ratio=0.1"), tmp_path / "a")
    assert not first["aligned_reused"] and len(cache_entries(tmp_path)) == 1
    caplog.clear()
    second = run_module.run(tiny_cfg("harmful_ratio=0.5", "finetune.seed=3", "finetune.sample_seed=4"),
                            tmp_path / "b")
    assert second["aligned_reused"]
    assert f"reused aligned model from {tmp_path / 'cache' / 'align'}" in caplog.text
    assert second["aligned_adapter"] == first["aligned_adapter"]
    assert second["aligned_harmful_score"] == first["aligned_harmful_score"]
    # anything that determines alignment gives a new entry
    third = run_module.run(tiny_cfg("align.optimizer.lr=2e-2"), tmp_path / "c")
    assert not third["aligned_reused"] and len(cache_entries(tmp_path)) == 2


def test_alignment_key_covers_the_alignment_texts(tiny_cfg, tmp_path, monkeypatch):
    from orchestration.experiment import Experiment

    key = Experiment(tiny_cfg(), tmp_path).align_key()
    assert Experiment(tiny_cfg("harmful_ratio=0.7", "finetune.n=10"), tmp_path).align_key() == key
    monkeypatch.setattr("orchestration.experiment.REFUSALS", ["I refuse."])
    assert Experiment(tiny_cfg(), tmp_path).align_key() != key


def test_killed_cache_write_leaves_no_entry(tiny_cfg, tmp_path, monkeypatch):
    def dying_save(model, path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(run_module, "save_adapter", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(tiny_cfg(), tmp_path / "a")
    assert cache_entries(tmp_path) == []  # no entry, no temp dir left behind
    monkeypatch.undo()
    # a directory without meta.json (e.g. from a hard kill) is never loaded
    results = run_module.run(tiny_cfg(), tmp_path / "b")
    assert not results["aligned_reused"]
    entry = tmp_path / "cache" / "align" / cache_entries(tmp_path)[0]
    (entry / "meta.json").unlink()
    assert not run_module.run(tiny_cfg(), tmp_path / "c")["aligned_reused"]


def test_eval_stage_on_a_given_checkpoint_reproduces_the_run(tiny_cfg, tmp_path):
    full = run_module.run(tiny_cfg(), tmp_path / "full")
    adapter = tmp_path / "full" / "adapters" / "deployed.safetensors"
    only_eval = run_module.run(tiny_cfg("stages=[eval]", f"checkpoint={adapter}"), tmp_path / "eval")
    for key in ("harmful_score", "harmful_score_plus", "finetune_accuracy"):
        assert only_eval[key] == full[key]
    assert "aligned_harmful_score" not in only_eval


@pytest.mark.parametrize("overrides,message", [
    (["harmful_ratio=1.5"], "harmful_ratio=1.5 must be a number in \\[0, 1\\]"),
    (["harmful_ratio=-0.1"], "harmful_ratio=-0.1 must be a number in \\[0, 1\\]"),
    (["finetune.n=500", "harmful_ratio=1.0"], "needs 500 harmful samples, but the user's harmful pool has 177"),
    (["stages=[eval]"], "pass checkpoint=PATH"),
    (["stages=[finetune,align]"], "must be in pipeline order"),
    (["data.harmful_pairs=/nonexistent/pairs.json"], "data file not found: /nonexistent/pairs.json"),
    (["model.template=vicuna"], "model.template='vicuna' must be one of"),
])
def test_bad_input_fails_before_training_and_writes_no_cache(tiny_cfg, tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        run_module.run(tiny_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_malformed_data_file_is_reported_with_its_line(tiny_cfg, tmp_path):
    bad = tmp_path / "pairs.json"
    bad.write_text('[\n{"user": "a", "assistant": "b", "category": "Harmful"},\n{"user": }\n]')
    with pytest.raises(InputError, match=rf"{bad}:3: malformed JSON"):
        run_module.run(tiny_cfg(f"data.harmful_pairs={bad}"), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_command_line_errors(tmp_path):
    """The real entry point: one clear message, exit code 2, no traceback; Hydra lists options."""
    def cli(*args):
        return subprocess.run([sys.executable, "run.py", "model=tiny", f"cache_dir={tmp_path}/cache",
                               f"hydra.run.dir={tmp_path}/run", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    bad_ratio = cli("harmful_ratio=2")
    assert bad_ratio.returncode == 2
    assert "error: invalid configuration:\n  - harmful_ratio=2 must be a number in [0, 1]" in bad_ratio.stderr
    assert "Traceback" not in bad_ratio.stderr
    for group, name in (("defense", "sft"), ("model", "smollm2"), ("task", "arithmetic")):
        unknown = cli(f"{group}=nope")
        assert unknown.returncode != 0
        assert f"Could not find '{group}/nope'" in unknown.stderr and name in unknown.stderr
    assert not (tmp_path / "cache").exists()


def test_multirun_sweep_aligns_once(tmp_path):
    """`-m` over harmful_ratio with the basic launcher: one alignment, one results.json per point."""
    from conftest import TINY

    done = subprocess.run(
        [sys.executable, "run.py", "-m", *TINY, "harmful_ratio=0,0.5", f"cache_dir={tmp_path}/cache",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = sorted(json.loads(p.read_text())["harmful_ratio"] for p in (tmp_path / "sweep").glob("*/results.json"))
    assert results == [0, 0.5]
    assert len(cache_entries(tmp_path)) == 1
    assert "reused aligned model from" in done.stdout + done.stderr


@pytest.mark.parametrize("defense", ["panacea", "random_perturb"])
def test_post_fine_tuning_defenses_report_before_and_after(tiny_cfg, tmp_path, defense):
    results = run_module.run(tiny_cfg(f"defense={defense}", "defense.finetune.harmful_batch_size=4"
                                      if defense == "panacea" else "defense.post.intensity=0.5"), tmp_path / "run")
    for key in ("harmful_score", "finetune_accuracy"):
        assert f"before_post_{key}" in results and key in results
    assert (tmp_path / "run" / "generations_before_post.jsonl").is_file()
    assert (tmp_path / "run" / "finetune_diagnostics" / "epsilon_layer_norms.png").is_file() == (defense == "panacea")
    assert "post" in results["seconds"]


def test_antibody_and_its_ablations_share_alignments_and_write_diagnostics(tiny_cfg, tmp_path):
    """defense=antibody aligns with Antibody (cached, diagnostics stored with the adapter) and
    fine-tunes with weighting; antibody_align reuses that alignment; antibody_weighting reuses
    plain SFT's alignment (the one defense=sft makes)."""
    full = run_module.run(tiny_cfg("defense=antibody", "harmful_ratio=0.2"), tmp_path / "full")
    assert not full["aligned_reused"]
    assert full["align_diagnostics"]["steps"] == 3 and 0 <= full["finetune_diagnostics"]["score_auroc_after"] <= 1
    for name in ("align_diagnostics/antibody_lambda.png", "finetune_diagnostics/antibody_scores.png",
                 "finetune_diagnostics/antibody_weights.csv", "finetune_diagnostics/summary.json"):
        assert (tmp_path / "full" / name).stat().st_size > 0, name

    align_only = run_module.run(tiny_cfg("defense=antibody_align", "harmful_ratio=0.2"), tmp_path / "align_only")
    assert align_only["aligned_reused"] and align_only["aligned_adapter"] == full["aligned_adapter"]
    assert (tmp_path / "align_only" / "align_diagnostics" / "antibody_lambda.csv").is_file()
    assert "finetune_diagnostics" not in align_only

    sft = run_module.run(tiny_cfg("defense=sft", "harmful_ratio=0.2"), tmp_path / "sft")
    weighting = run_module.run(tiny_cfg("defense=antibody_weighting", "harmful_ratio=0.2"), tmp_path / "weighting")
    assert weighting["aligned_reused"] and weighting["aligned_adapter"] == sft["aligned_adapter"] != full["aligned_adapter"]
    assert "align_diagnostics" not in weighting and "finetune_diagnostics" in weighting
