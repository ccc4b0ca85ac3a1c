"""The tuning report on a study's tuning.json as the Optuna sweeper writes it (a real optuna
study in memory, summarized by the sweeper's own write_summary): each trial's mean with its t
interval over the repeats, the picked trial, failed trials shown, bad input refused with
nothing written."""

import json
import statistics
import sys

import pytest
from scipy import stats

from helpers.results import write_point
from orchestration.tuning_report import report

OBJECTIVES = {"harmful_score": "minimize", "finetune_accuracy": "maximize"}
RULE = {"best": "harmful_score", "within": {"finetune_accuracy": 5.0}}
# rho -> each seed's (HS, FA)
TRIALS = {
    1.0: [(80.0, 96.0), (70.0, 97.0), (75.0, 98.0)],
    3.0: [(40.0, 90.0), (50.0, 94.0), (45.0, 92.0)],  # FA 92: within 5 of 97, lowest HS
    0.2: [(90.0, 99.0), (85.0, 95.0), (95.0, 97.0)],
    9.0: [(10.0, 60.0), (20.0, 70.0), (15.0, 50.0)],  # lowest HS, FA too low
}


def write_study(sweep, trials=TRIALS, failed=True, pick=RULE):
    import optuna

    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import OptunaSweeper

    space = {"defense.finetune.rho": {"type": "float", "low": 0.1, "high": 10.0, "log": True}}
    study = optuna.create_study(directions=list(OBJECTIVES.values()))
    distribution = optuna.distributions.FloatDistribution(0.1, 10.0, log=True)
    for rho, per_seed in trials.items():
        study.add_trial(
            optuna.trial.create_trial(
                params={"defense.finetune.rho": rho},
                distributions={"defense.finetune.rho": distribution},
                values=[statistics.fmean(column) for column in zip(*per_seed)],
                user_attrs={
                    "repeats": {
                        "overrides": [["seed=3"], ["seed=4"], ["seed=5"]],
                        "values": [list(v) for v in per_seed],
                    }
                },
            )
        )
    if failed:  # killed, then asked again with its values (which failed this time)
        for user_attrs in ({}, {"retry_of": len(study.trials)}):
            study.add_trial(
                optuna.trial.create_trial(
                    params={"defense.finetune.rho": 5.0},
                    distributions={"defense.finetune.rho": distribution},
                    state=optuna.trial.TrialState.FAIL,
                    user_attrs=user_attrs,
                )
            )
    sweeper = OptunaSweeper(space, OBJECTIVES, 4, "sqlite:///x", "tune", pick=pick)
    sweep.mkdir(parents=True, exist_ok=True)
    sweeper.write_summary(study, sweep / "tuning.json")
    (sweep / "multirun.yaml").write_text(
        json.dumps({"hydra": {"sweeper": {"search_space": space}}})
    )


def t_interval(values, level=0.95):
    """Independent of evaluation.statistics: scipy's t quantile by hand."""
    mean, sem = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    half = stats.t.ppf((1 + level) / 2, df=len(values) - 1) * sem
    return mean - half, mean + half


def test_each_trial_with_its_interval_and_the_pick(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "docs"
    write_study(sweep)

    # rho = 3's runs, as the sweeper names them (HS+ read from their results.json), a run of
    # another rho, and rho = 1 with one run missing (its HS+: none rather than a partial mean)
    def run(name, rho, seed, hs_plus, extra=()):
        hs, fa = TRIALS[rho][seed - 3]  # what the study recorded for this run
        overrides = ["experiment=tune", f"defense.finetune.rho={rho}", f"seed={seed}", *extra]
        write_point(
            sweep / name,
            overrides,
            seed=seed,
            harmful_score=hs,
            finetune_accuracy=fa,
            harmful_score_plus=hs_plus,
        )

    for seed, hs_plus in zip((3, 4, 5), (70.0, 80.0, 90.0)):
        run(f"rho3_s{seed}", 3.0, seed, hs_plus)
    run("rho9_s3", 9.0, 3, 5.0)
    run("rho1_s3", 1.0, 3, 5.0)
    # a rerun of rho = 9, seed 4 with another override and other results: not taken for it
    write_point(
        sweep / "rho9_s4_test",
        ["defense.finetune.rho=9.0", "seed=4", "x=1"],
        harmful_score_plus=1.0,
    )
    rows = report(sweep, out)
    # finished trials in the order of rho, the failed one last
    assert [r["params"]["defense.finetune.rho"] for r in rows] == [0.2, 1.0, 3.0, 9.0, 5.0, 5.0]
    for row in rows[:4]:
        per_seed = TRIALS[row["params"]["defense.finetune.rho"]]
        for i, metric in enumerate(OBJECTIVES):
            values = [v[i] for v in per_seed]
            assert row[metric]["values"] == values
            assert row[metric]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[metric]["interval"] == pytest.approx(t_interval(values))
    assert [r["picked"] for r in rows] == [False, False, True, False, False, False]
    # the Pareto front of (HS down, FA up): rho 1 (75, 97), 3 (45, 92), 9 (15, 60); rho 0.2
    # (90, 97) is dominated by rho 1
    assert [r["pareto"] for r in rows] == [False, True, True, True, False, False]
    assert rows[-1]["state"] == "FAIL" and rows[-1]["harmful_score"]["mean"] is None
    table = (out / "tuning.md").read_text()
    low, high = t_interval([40.0, 50.0, 45.0])
    line = next(line for line in table.splitlines() if line.startswith("| 1 |"))  # rho = 3
    assert f"45.0 [{low:.1f}, {high:.1f}] (40, 50, 45)" in line and "picked" in line
    low, high = t_interval([70.0, 80.0, 90.0])  # HS+ is a percentage: high (104.8) clipped
    assert high > 100 and f"| 80.0 [{low:.1f}, 100.0] (70, 80, 90) | picked, Pareto |" in line
    assert rows[1]["harmful_score_plus"]["values"] == []  # rho = 1: seeds 4 and 5 not found
    assert rows[3]["harmful_score_plus"]["values"] == []  # rho = 9: seed 4's is another run's
    assert "| 4 | 5 | – | – | – | fail |" in table
    low, _ = t_interval([90.0, 85.0, 95.0])  # its high end, 102.4, is clipped: a percentage
    assert f"| 2 | 0.2 | 90.0 [{low:.1f}, 100.0] (90, 85, 95) |" in table
    assert "| 5 | 5 | – | – | – | fail, retry of trial 4 |" in table
    assert "Picked: trial 1, `defense.finetune.rho=3.0`" in table
    assert json.dumps(RULE) in table
    assert "Finished trials: 4 of 6 asked (2 did not finish: see the table)." in table
    assert (out / "tuning.png").stat().st_size > 0
    assert json.loads((out / "tuning.json").read_text()) == json.loads(
        (sweep / "tuning.json").read_text()
    )


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    from orchestration import tuning_report

    out = tmp_path / "docs"
    empty = tmp_path / "empty"
    empty.mkdir()
    failed_only = tmp_path / "failed_only"
    write_study(failed_only, trials={})
    done = tmp_path / "done"
    write_study(done)
    for sweep, args, message in (
        (empty, [], "no tuning.json in"),
        (failed_only, [], "no trial of the study"),
        (done, ["--level", "1.5"], "--level"),
    ):
        monkeypatch.setattr(sys, "argv", ["tuning_report", str(sweep), "--out", str(out), *args])
        with pytest.raises(SystemExit) as stop:
            tuning_report.main()
        assert message in str(stop.value) and str(stop.value).startswith("error: ")
        assert not out.exists()


def test_one_objective_and_a_categorical_value(tmp_path):
    """No searched number and no plane of two objectives: no figure (a stale one is removed),
    the best trial is called best, and a metric that is not a percentage is not clipped."""
    import optuna

    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import OptunaSweeper

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(direction="minimize")
    choice = optuna.distributions.CategoricalDistribution(["a", "b"])
    for value, per_seed in (("b", [-5.0, 5.0]), ("a", [1.0, 3.0])):
        study.add_trial(
            optuna.trial.create_trial(
                params={"defense.kind": value},
                distributions={"defense.kind": choice},
                values=[statistics.fmean(per_seed)],
                user_attrs={
                    "repeats": {
                        "overrides": [["seed=0"], ["seed=1"]],
                        "values": [[v] for v in per_seed],
                    }
                },
            )
        )
    OptunaSweeper({}, {"loss": "minimize"}, 2, "sqlite:///x", "tune").write_summary(
        study, sweep / "tuning.json"
    )
    (sweep / "tuning.png").write_bytes(b"stale")
    rows = report(sweep)
    assert [r["params"]["defense.kind"] for r in rows] == ["a", "b"]
    assert not (sweep / "tuning.png").exists()
    table = (sweep / "tuning.md").read_text()
    low, high = t_interval([-5.0, 5.0])  # about [-63.5, 63.5]: not a percentage, not clipped
    assert f"| 0 | b | 0.0 [{low:.1f}, {high:.1f}] (-5, 5) | best |" in table
    assert "Pareto" not in table and "HS+" not in table  # HS+ only beside HS


def test_hs_plus_is_described_only_beside_hs_and_never_over_an_objective():
    from orchestration.tuning_report import described_metrics

    assert described_metrics({"harmful_score": "minimize"}) == ["harmful_score_plus"]
    assert described_metrics({"harmful_score": "minimize", "harmful_score_plus": "minimize"}) == []
    assert described_metrics({"loss": "minimize"}) == []
