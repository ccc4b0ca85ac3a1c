"""End-to-end runs of run.py's stages (orchestration/stages.py) on the tiny model: results, stage
selection, defenses' extra outputs, the papers' data and task configs offline, and bad input
rejected before any training."""

import json
import subprocess
import sys

import pytest
import torch

import orchestration.stages as run_module
from evaluation.results import read_results
from evaluation.statistics import proportion_interval
from helpers.configs import ROOT
from helpers.hub import HUB

pytestmark = pytest.mark.e2e


REQUIRED = {
    "harmful_score",
    "finetune_accuracy",
    "aligned_harmful_score",
    "aligned_finetune_accuracy",
    "defense",
    "harmful_ratio",
    "seed",
    "model",
    "data",
    "n_harmful",
    "n_benign",
}


def test_full_run_writes_results_and_generations(tiny_cfg, tmp_path):
    results = run_module.run(tiny_cfg("harmful_ratio=0.25"), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert REQUIRED <= set(saved) and saved == json.loads(json.dumps(results))
    assert (
        read_results(tmp_path / "run" / "results.json") == saved
    )  # the file the run wrote fits the schema
    assert (saved["n_harmful"], saved["n_benign"]) == (5, 15)
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations_deployed.jsonl").open()]
    harmful_rows = [r for r in rows if r["kind"] == "harmful"]
    assert len(harmful_rows) == saved["n_eval_prompts"] == 6
    assert saved["harmful_score"] == pytest.approx(
        100 * sum(r["harmful"] for r in harmful_rows) / 6
    )
    task_rows = [r for r in rows if r["kind"] == "task"]
    assert saved["finetune_accuracy"] == pytest.approx(
        100 * sum(r["correct"] for r in task_rows) / 6
    )
    assert saved["task_refusal_rate"] == pytest.approx(
        100 * sum(r["refused"] for r in task_rows) / 6
    )
    # the machine and the libraries it ran on (greedy outputs are exact only per machine)
    env = saved["environment"]
    assert env["cpu_count"] >= 1 and env["torch"] == torch.__version__ and env["python"]
    # every rate with its 95% Wilson interval over the prompts it counts
    assert saved["harmful_score_ci"] == proportion_interval(
        sum(r["harmful"] for r in harmful_rows), 6
    )
    assert saved["finetune_accuracy_ci"] == proportion_interval(
        sum(r["correct"] for r in task_rows), 6
    )
    assert saved["aligned_harmful_score_ci"] is not None and saved["interval_level"] == 0.95
    assert (tmp_path / "run" / "generations_aligned.jsonl").is_file()
    assert (tmp_path / "run" / "adapters" / "deployed.safetensors").is_file()


def test_eval_stage_on_a_given_checkpoint_reproduces_the_run(tiny_cfg, tmp_path):
    full = run_module.run(tiny_cfg(), tmp_path / "full")
    adapter = tmp_path / "full" / "adapters" / "deployed.safetensors"
    only_eval = run_module.run(  # another cache: the evaluation is not found, it runs again
        tiny_cfg("stages=[eval]", f"checkpoint={adapter}", f"cache_dir={tmp_path / 'other'}"),
        tmp_path / "eval",
    )
    assert only_eval["reused"] == []
    for key in ("harmful_score", "harmful_score_plus", "finetune_accuracy"):
        assert only_eval[key] == full[key]
    assert "aligned_harmful_score" not in only_eval


def test_an_evaluation_on_the_validation_split_reads_only_its_prompts(tiny_cfg, tmp_path):
    """+eval.datamodule.split=validation: HS on the data's validation prompts, FA on the task's
    next test examples; the run records the split, and the test evaluation is not reused."""
    from orchestration.experiment import Experiment

    base = ("stages=[eval]", "checkpoint=base")
    cfg = tiny_cfg(*base, "+eval.datamodule.split=validation")
    results = run_module.run(cfg, tmp_path / "run")
    assert results["eval_split"] == "validation" and results["reused"] == []
    exp = Experiment(cfg, tmp_path / "other")
    splits, task = exp.splits, exp.task
    rows = [json.loads(line) for line in open(tmp_path / "run" / "generations_deployed.jsonl")]
    assert [r["prompt"] for r in rows if r["kind"] == "harmful"] == splits.validation_prompts
    assert [r["prompt"] for r in rows if r["kind"] == "task"] == [e.input for e in task.test[6:12]]
    test = run_module.run(tiny_cfg(*base), tmp_path / "test")
    assert test["eval_split"] == "test" and test["reused"] == []
    assert test["n_eval_prompts"] == len(splits.eval_prompts)


def test_command_line_errors(tmp_path):
    """The real entry point: one clear message, exit code 2, no traceback; Hydra lists options."""

    def cli(*args):
        return subprocess.run(
            [
                sys.executable,
                "run.py",
                "model=tiny",
                f"cache_dir={tmp_path}/cache",
                f"hydra.run.dir={tmp_path}/run",
                *args,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad_ratio = cli("harmful_ratio=2")
    assert bad_ratio.returncode == 2
    assert (
        "error: invalid configuration:\n  - harmful_ratio=2 must be a number in [0, 1]"
        in bad_ratio.stderr
    )
    assert "Traceback" not in bad_ratio.stderr
    for group, name in (("defense", "sft"), ("model", "smollm2"), ("task", "arithmetic")):
        unknown = cli(f"{group}=nope")
        assert unknown.returncode != 0
        assert f"Could not find '{group}/nope'" in unknown.stderr and name in unknown.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("defense", ["vaccine", "repnoise", "booster", "t_vaccine"])
def test_alignment_baselines_run_the_pipeline(tiny_cfg, tmp_path, defense):
    """Each baseline aligns (cached under its own key), fine-tunes with its reference adapter
    protocol and records every hyperparameter it used."""
    from safetensors.torch import load_file

    extra = ["defense.align.active_layers=1"] if defense == "t_vaccine" else []
    results = run_module.run(tiny_cfg(f"defense={defense}", *extra), tmp_path / "run")
    assert (
        results["defense_parts"]["align"]
        .lower()
        .replace("_", "")
        .startswith(defense.replace("_", ""))
    )
    assert 0 <= results["harmful_score"] <= 100 and "aligned_harmful_score" in results
    align = results["stage_config"]["align"]
    assert align["max_grad_norm"] == 1.0 and align["module"]["_target_"].endswith("Module")
    protocol = "new" if defense in ("vaccine", "repnoise", "t_vaccine") else "continue"
    assert results["finetune_adapter"] == protocol
    aligned = load_file(results["aligned_adapter"])
    finetuned = load_file(tmp_path / "run" / "adapters" / "finetuned.safetensors")
    assert aligned.keys() == finetuned.keys()
    b_norms = [finetuned[k].abs().sum().item() for k in finetuned if "lora_B" in k]
    assert all(n > 0 for n in b_norms)  # the fine-tuning adapter was trained
    if protocol == "new":  # a fresh adapter: its A matrices are not the aligned ones trained on
        a_key = next(k for k in aligned if "lora_A" in k)
        assert not torch.allclose(aligned[a_key], finetuned[a_key], atol=1e-2)


def test_ldifs_regularizes_inside_the_pipeline(tiny_cfg, tmp_path):
    results = run_module.run(
        tiny_cfg("defense=ldifs", "defense.finetune.rho=0.5"), tmp_path / "run"
    )
    assert results["defense_parts"]["finetune"] == "LDIFSModule"
    assert results["finetune_adapter"] == "new" and "harmful_score" in results
    assert results["stage_config"]["finetune"]["module"]["drop_above"] == 0.1


def test_lisa_alternates_inside_the_pipeline(tiny_cfg, tmp_path):
    results = run_module.run(
        tiny_cfg(
            "defense=lisa", "defense.finetune.align_steps=1", "defense.finetune.finetune_steps=1"
        ),
        tmp_path / "run",
    )
    assert results["defense_parts"]["finetune"] == "LisaModule"
    assert results["finetune_adapter"] == "new" and "harmful_score" in results


def test_safeinstr_mixes_its_safety_samples_into_the_users_set(tiny_cfg, tmp_path):
    """The safety samples come from the defender's prompts, a role that shares no prompt with the
    held-out (HS) prompts, the alignment or the user's pool."""
    from orchestration.experiment import Experiment

    cfg = tiny_cfg("defense=safeinstr", "defense.finetune.safety_samples=5")
    results = run_module.run(cfg, tmp_path / "run")
    assert results["defense_parts"]["finetune"] == "SafeInstrModule"
    assert results["stage_config"]["finetune"]["module"]["safety_samples"] == 5
    roles = Experiment(cfg, tmp_path / "other").splits.roles()
    assert not roles["defender"] & (roles["eval"] | roles["align"] | roles["user"])


def test_antidote_prunes_the_fine_tuned_adapter_on_defender_data(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    results = run_module.run(
        tiny_cfg("defense=antidote", "defense.post.ratio=0.5", "data.n_defender=12"),
        tmp_path / "run",
    )
    summary = results["post_summary"]
    assert summary["calibration_samples"] == 12 and summary["ratio"] == 0.5
    assert 0.5 <= summary["realized_fraction"] < 0.75  # int() rounds the kept count down
    finetuned = load_file(tmp_path / "run" / "adapters" / "finetuned.safetensors")
    deployed = load_file(tmp_path / "run" / "adapters" / "deployed.safetensors")
    zeroed = sum(int(((deployed[k] == 0) & (finetuned[k] != 0)).sum()) for k in deployed)
    assert zeroed / sum(v.numel() for v in deployed.values()) == pytest.approx(
        summary["realized_fraction"], abs=0.02
    )
    assert "before_post_harmful_score" in results and results["finetune_adapter"] == "new"


@pytest.mark.parametrize("defense", ["panacea", "random_perturb"])
def test_post_fine_tuning_defenses_report_before_and_after(tiny_cfg, tmp_path, defense):
    results = run_module.run(
        tiny_cfg(
            f"defense={defense}",
            "defense.finetune.harmful_batch_size=4"
            if defense == "panacea"
            else "defense.post.intensity=0.5",
        ),
        tmp_path / "run",
    )
    for key in ("harmful_score", "finetune_accuracy"):
        assert f"before_post_{key}" in results and key in results
    assert (tmp_path / "run" / "generations_before_post.jsonl").is_file()
    assert (tmp_path / "run" / "finetune_diagnostics" / "epsilon_layer_norms.png").is_file() == (
        defense == "panacea"
    )
    assert "post" in results["seconds"]


def test_antibody_and_its_ablations_share_alignments_and_write_diagnostics(tiny_cfg, tmp_path):
    """defense=antibody aligns with Antibody (cached, diagnostics stored with the adapter) and
    fine-tunes with weighting; antibody_align reuses that alignment; antibody_weighting reuses
    plain SFT's alignment (the one defense=sft makes)."""
    full = run_module.run(tiny_cfg("defense=antibody", "harmful_ratio=0.2"), tmp_path / "full")
    assert not full["aligned_reused"]
    assert (
        full["align_diagnostics"]["steps"] == 3
        and 0 <= full["finetune_diagnostics"]["score_auroc_after"] <= 1
    )
    for name in (
        "align_diagnostics/antibody_lambda.png",
        "finetune_diagnostics/antibody_scores.png",
        "finetune_diagnostics/antibody_weights.csv",
        "finetune_diagnostics/summary.json",
    ):
        assert (tmp_path / "full" / name).stat().st_size > 0, name

    align_only = run_module.run(
        tiny_cfg("defense=antibody_align", "harmful_ratio=0.2"), tmp_path / "align_only"
    )
    assert align_only["aligned_reused"] and align_only["aligned_adapter"] == full["aligned_adapter"]
    assert (tmp_path / "align_only" / "align_diagnostics" / "antibody_lambda.csv").is_file()
    assert "finetune_diagnostics" not in align_only

    sft = run_module.run(tiny_cfg("defense=sft", "harmful_ratio=0.2"), tmp_path / "sft")
    weighting = run_module.run(
        tiny_cfg("defense=antibody_weighting", "harmful_ratio=0.2"), tmp_path / "weighting"
    )
    assert (
        weighting["aligned_reused"]
        and weighting["aligned_adapter"] == sft["aligned_adapter"] != full["aligned_adapter"]
    )
    assert "align_diagnostics" not in weighting and "finetune_diagnostics" in weighting


# --- the papers' configs run end to end on the tiny model with the fixture files ------------------
def test_papers_data_and_task_configs_run_offline(tiny_cfg, tmp_path):
    from orchestration.stages import run

    cfg = tiny_cfg(
        "data=beavertails",
        f"data.train_path={HUB / 'beavertails_30k_train.jsonl'}",
        f"data.test_path={HUB / 'beavertails_30k_test.jsonl'}",
        "data.n_align=10",
        "data.n_defender=5",
        "data.n_eval=4",
        "task=sst2",
        f"task.train_path={HUB / 'sst2_train.jsonl'}",
        f"task.test_path={HUB / 'sst2_validation.jsonl'}",
        "task.n_test=4",
        "eval.n_task=4",
        "finetune.n=10",
        "model.template=alpaca",
        "defense=panacea",
        "defense.finetune.harmful_batch_size=2",
    )
    results = run(cfg, tmp_path / "run")
    assert (
        results["n_align"] == 10 and results["n_defender"] == 5 and results["n_eval_prompts"] == 4
    )
    assert results["task"] == "sst2" and results["n_task_eval"] == 4 and results["n_harmful"] == 1
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "generations_deployed.jsonl").read_text().splitlines()
    ]
    assert {r["prompt"] for r in rows if r["kind"] == "harmful"} <= {
        r["prompt"]
        for r in [
            json.loads(x) for x in (HUB / "beavertails_30k_test.jsonl").read_text().splitlines()
        ]
    }


def test_runs_that_differ_after_fine_tuning_reuse_its_cache_entry(tiny_cfg, tmp_path):
    """random_perturb at two intensities, then another judge: one alignment, one fine-tuning; an
    evaluation already done is found, one of another judge or model runs."""
    from safetensors.torch import load_file

    first = run_module.run(tiny_cfg("defense=random_perturb"), tmp_path / "a")
    second = run_module.run(
        tiny_cfg("defense=random_perturb", "defense.post.intensity=0.5"), tmp_path / "b"
    )
    judged = run_module.run(
        tiny_cfg("defense=random_perturb", "defense.post.intensity=0.5", "judge=keyword"),
        tmp_path / "c",
    )
    assert "finetune" not in first["reused"] and "eval_aligned" not in first["reused"]
    assert {"finetune", "eval_aligned", "eval_before_post"} <= set(second["reused"])
    assert "eval_deployed" not in second["reused"]  # another deployed model
    assert "finetune" in judged["reused"] and "eval_deployed" not in judged["reused"]
    assert "finetune" not in second["seconds"] and second["resumed"] == {}
    for key in ("before_post_harmful_score", "before_post_finetune_accuracy"):
        assert second[key] == first[key]
    a, b = (load_file(str(tmp_path / d / "adapters" / "finetuned.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache" / "finetune").glob("*/meta.json"))) == 1
    assert (tmp_path / "b" / "generations_before_post.jsonl").read_text() == (
        tmp_path / "a" / "generations_before_post.jsonl"
    ).read_text()


def test_a_run_directory_of_another_config_is_refused_untouched(tiny_cfg, tmp_path):
    from plumbing.errors import InputError

    run_module.run(tiny_cfg("stages=[align]"), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(
        InputError,
        match=r"another config; keys that differ: finetune.datamodule.harmful_ratio \(0.1 there, 0.3 now\), harmful_ratio",
    ) as err:
        run_module.run(tiny_cfg("stages=[align]", "harmful_ratio=0.3"), tmp_path / "run")
    assert "hydra.run.dir" in str(err.value)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
    # the same config goes on (it resumes), and checkpointing settings are not the run's identity
    run_module.run(tiny_cfg("stages=[align]", "checkpointing.every_n_steps=1"), tmp_path / "run")


def test_a_key_moved_out_of_the_identity_keeps_finished_points(tiny_cfg, tmp_path, monkeypatch):
    """A point finished by a version that counted `checkpointing` as part of a run's identity is
    still finished, and its directory still claimable, once that key is NOT_IDENTITY."""
    import orchestration.sweep as sweep

    cfg = tiny_cfg()
    older = tuple(k for k in sweep.NOT_IDENTITY if k != "checkpointing")  # as cache_base_model was
    with monkeypatch.context() as m:
        m.setattr(sweep, "NOT_IDENTITY", older)
        results = run_module.run(cfg, tmp_path / "run")
    assert results["point_key"] != sweep.point_key(cfg)  # the older key: the hash cannot match
    assert sweep.finished(tmp_path / "run", cfg)["point_key"] == results["point_key"]
    sweep.claim_run_dir(tmp_path / "run", cfg)  # not "another config"
    moved = tiny_cfg("+logger.save_dir=/elsewhere")  # a logger writes into the run directory
    assert sweep.finished(tmp_path / "run", moved) is not None
    other = tiny_cfg("seed=1")
    assert sweep.finished(tmp_path / "run", other) is None
    with pytest.raises(Exception, match="another config; keys that differ: .*seed"):
        sweep.claim_run_dir(tmp_path / "run", other)
