"""hydra/sweeper=optuna (hydra_plugins/hfd_optuna_sweeper): a two-objective study of Panacea's ρ on
the tiny model, stored in SQLite and continued by the same command; a bad search space refused
before anything is written."""

import json

import pytest
from scipy import stats

from helpers.configs import compose_cfg, run_tiny
from orchestration import tuning_report


def study(path):
    import optuna

    return optuna.load_study(study_name="tune_panacea_rho", storage=f"sqlite:///{path}")


@pytest.mark.e2e
def test_study_is_stored_and_continued(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "experiment=tune_panacea_rho",
        "defense.finetune.harmful_batch_size=4",
        "hydra.sweeper.repeats=null",  # one run per trial (repeats: a test below)
        f"hydra.sweep.dir={sweep}",
    ]
    first = run_tiny(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-2000:]
    trials = study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:  # each trial's values are its run's results.json metrics
        run_dir = next(
            d
            for d in sweep.iterdir()
            if (d / "results.json").is_file()
            and json.loads((d / "results.json").read_text())["stage_config"]["finetune"]["module"][
                "rho"
            ]
            == pytest.approx(t.params["defense.finetune.rho"])
        )
        results = json.loads((run_dir / "results.json").read_text())
        assert t.values == [results["harmful_score"], results["finetune_accuracy"]]
        assert results["eval_split"] == "validation"  # tuned apart from the reported test split
        assert 0.1 <= t.params["defense.finetune.rho"] <= 10.0  # the experiment's range
    summary = json.loads((sweep / "tuning.json").read_text())
    assert len(summary["trials"]) == 2 and summary["best"]
    # the experiment's rule: FA within 5 of the best FA, then the lowest HS (ties: the higher
    # FA, then the earliest)
    best_fa = max(t["values"][1] for t in summary["trials"])
    eligible = [t for t in summary["trials"] if t["values"][1] >= best_fa - 5]
    expected = min(eligible, key=lambda t: (t["values"][0], -t["values"][1], t["number"]))
    assert summary["picked"] == expected

    again = run_tiny(tmp_path, *args, "hydra.sweeper.n_trials=3")  # continues: one more trial
    assert again.returncode == 0, again.stderr[-2000:]
    trials = study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len([d for d in sweep.iterdir() if (d / "results.json").is_file()]) == 3


@pytest.mark.e2e
def test_a_killed_trial_is_asked_again_with_its_values(tmp_path):
    """A trial left RUNNING (its sweep was killed) fails, and the continued study asks its values
    again first: the same overrides name the same points, which resume instead of restarting."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "experiment=tune_panacea_rho",
        "defense.finetune.harmful_batch_size=4",
        "hydra.sweeper.repeats=null",
        f"hydra.sweep.dir={sweep}",
    ]
    first = run_tiny(tmp_path, *args, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-2000:]
    killed = study(sweep / "optuna.db").ask()  # what a sweep killed mid-trial leaves behind
    rho = killed.suggest_float("defense.finetune.rho", 0.1, 10.0, log=True)

    again = run_tiny(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert again.returncode == 0, again.stderr[-2000:]
    trials = study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == {"defense.finetune.rho": rho}
    assert trials[2].user_attrs["retry_of"] == killed.number == 1
    assert json.loads((sweep / "tuning.json").read_text())["trials"][2]["retry_of"] == 1
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    rhos = {r["stage_config"]["finetune"]["module"]["rho"] for r in runs}
    assert rhos == {trials[0].params["defense.finetune.rho"], rho}

    # a retry killed too is not asked a third time: the study moves on to new values
    killed_again = study(sweep / "optuna.db").ask()
    killed_again.suggest_float("defense.finetune.rho", 0.1, 10.0, log=True)
    killed_again.set_user_attr("retry_of", 1)
    third = run_tiny(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert third.returncode == 0, third.stderr[-2000:]
    trials = study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert "retry_of" not in trials[4].user_attrs and trials[4].params != killed_again.params

    # the pick rule is the one the study started with
    changed = run_tiny(
        tmp_path, *args, "hydra.sweeper.n_trials=3", "hydra.sweeper.pick.within.finetune_accuracy=9"
    )
    assert changed.returncode == 1
    assert "differs from the rule the study tune_panacea_rho started with" in changed.stderr


def run_tuning_variant(tmp_path, sweeper_yaml: str, *overrides: str):
    """`run.py -m` of an experiment file written here: tune_panacea_rho with `sweeper_yaml`
    (lines under hydra.sweeper) on top."""
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "variant.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tune_panacea_rho\nhydra:\n  sweeper:\n" + sweeper_yaml
    )
    return run_tiny(
        tmp_path,
        "-m",
        "experiment=variant",
        *overrides,
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )


def test_bad_search_space_is_refused_before_anything_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_tuning_variant(
        tmp_path,
        "    search_space:\n"
        "      defense.finetune.rh: {type: float, low: 0.1, high: 1.0}\n"
        "      defense.finetune.lam: {type: uniform, low: 0.1, high: 1.0}\n"
        "    pick: {best: hs}\n",
    )
    assert result.returncode == 1
    assert (
        "search_space key 'defense.finetune.rh' is not a key of the composed config"
        in result.stderr
    )
    assert "'defense.finetune.lam': type='uniform' must be one of" in result.stderr
    assert "hydra.sweeper.pick.best='hs' must be one of the objectives" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sweep.exists() and not (tmp_path / "cache").exists()


def test_a_config_no_trial_could_run_stops_the_study_before_it_starts(tmp_path):
    """run.py's own checks, on the config every trial runs and at each end of the searched range:
    one message and nothing written, instead of max_failures failed trials."""
    sweep = tmp_path / "sweep"
    result = run_tuning_variant(
        tmp_path,
        "    search_space:\n      defense.finetune.rho: {type: float, low: -1.0, high: 1.0}\n",
        "harmful_ratio=2",
    )
    assert result.returncode == 1
    assert "harmful_ratio=2 must be a number in [0, 1]" in result.stderr
    assert (
        "with defense.finetune.rho=-1.0 (searched): defense.finetune.rho=-1.0 must be a number >= 0"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not sweep.exists() and not (tmp_path / "cache").exists()


def test_the_trial_config_checks_name_what_every_trial_or_one_end_would_fail(tmp_path):
    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import trial_config_problems

    def rho(low, high):
        return {"defense.finetune.rho": {"type": "float", "low": low, "high": high}}

    bad = compose_cfg(tmp_path, "experiment=tune_panacea_rho", "harmful_ratio=2")
    fixed = "harmful_ratio=2 must be a number in [0, 1] (e.g. harmful_ratio=0.1)"
    assert trial_config_problems(bad, rho(0.1, 10.0)) == [fixed]  # every trial's, said once
    assert trial_config_problems(bad, rho(-1.0, 10.0)) == [
        fixed,
        "with defense.finetune.rho=-1.0 (searched): defense.finetune.rho=-1.0 must be a number >= 0",
    ]
    # two keys: the start's problem is put on the key whose other end removes it
    lam = {"defense.finetune.lam": {"type": "float", "low": -1.0, "high": 1.0}}
    assert trial_config_problems(bad, rho(0.1, 1.0) | lam) == [
        fixed,
        "with defense.finetune.lam=-1.0 (searched): defense.finetune.lam=-1.0 must be a number >= 0",
    ]
    # not refused: the searched key's own config value (no trial runs it), the GPUs of the
    # host that submits (trainer=gpu here, on a machine without one), a config group's choices
    fine = compose_cfg(
        tmp_path, "experiment=tune_panacea_rho", "defense.finetune.rho=-1", "trainer=gpu"
    )
    judges = {"judge": {"type": "categorical", "choices": ["keyword", "refusal"]}}
    assert trial_config_problems(fine, rho(0.1, 10.0) | judges) == []


def test_search_space_problems_name_each_bad_entry():
    from omegaconf import OmegaConf

    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import search_space_problems

    cfg = OmegaConf.create({"defense": {"finetune": {"rho": 1.0}}})
    assert (
        search_space_problems(
            {"defense.finetune.rho": {"type": "float", "low": 0.01, "high": 1.0}},
            cfg,
            {"harmful_score": "minimize"},
        )
        == []
    )
    problems = search_space_problems(
        {"defense.finetune.rho": {"type": "int", "low": 3, "high": 1}},
        cfg,
        {"harmful_score": "lowest"},
    )
    assert problems == [
        "search_space 'defense.finetune.rho': int needs low < high",
        "objective 'harmful_score': direction 'lowest' must be one of ('minimize', 'maximize')",
    ]


@pytest.mark.e2e
def test_a_study_whose_trials_all_fail_stops(tmp_path):
    """A bad fixed override that only the run can check fails every trial (each point records
    it): the study stops after max_failures of them instead of asking for trials forever. Here
    an unknown evaluation split, which the run checks against the data (the config checks made
    before the study do not)."""
    sweep = tmp_path / "sweep"
    result = run_tiny(
        tmp_path,
        "-m",
        "experiment=tune_panacea_rho",
        "eval.datamodule.split=valid",
        "hydra.sweeper.max_failures=2",
        "hydra.sweeper.repeats=null",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 1
    assert "the last 2 trials failed (hydra.sweeper.max_failures=2)" in result.stderr
    assert [t.state.name for t in study(sweep / "optuna.db").trials] == ["FAIL", "FAIL"]
    assert len(list(sweep.glob("*/failed.json"))) == 2


def test_the_sweepers_counts_are_checked():
    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import settings_problems

    assert settings_problems(12, 1, 3) == []
    assert settings_problems(0, True, 1.5) == [
        "hydra.sweeper.n_trials=0 must be a whole number >= 1",
        "hydra.sweeper.n_jobs=True must be a whole number >= 1",
        "hydra.sweeper.max_failures=1.5 must be a whole number >= 1",
    ]


@pytest.mark.e2e
def test_a_trial_with_repeats_is_the_mean_of_its_runs(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_tiny(
        tmp_path,
        "-m",
        "experiment=tune_panacea_rho",
        "defense.finetune.harmful_batch_size=4",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.repeats={seed: [0, 1]}",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (trial,) = study(sweep / "optuna.db").trials
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    for i, metric in enumerate(("harmful_score", "finetune_accuracy")):
        assert trial.values[i] == pytest.approx(sum(r[metric] for r in runs) / 2)
    assert trial.user_attrs["repeats"]["overrides"] == [["seed=0"], ["seed=1"]]
    summary = json.loads((sweep / "tuning.json").read_text())
    assert len(summary["trials"][0]["repeats"]["values"]) == 2
    # the tuning report reads the real tuning.json: the trial's runs, their mean and interval
    rows = tuning_report.report(sweep, tmp_path / "report")
    by_seed = sorted(runs, key=lambda r: r["seed"])  # the repeats' order: seed=0, seed=1
    hs = [r["harmful_score"] for r in by_seed]
    assert [r["harmful_score"]["values"] for r in rows] == [hs]
    # HS+ found in the trial's own run directories, as the sweeper named them
    assert rows[0]["harmful_score_plus"]["values"] == [r["harmful_score_plus"] for r in by_seed]
    assert rows[0]["harmful_score"]["mean"] == pytest.approx(sum(hs) / 2)
    half = stats.t.ppf(0.975, df=1) * abs(hs[0] - hs[1]) / 2  # t interval of 2 values
    assert rows[0]["harmful_score"]["interval"] == pytest.approx(
        [sum(hs) / 2 - half, sum(hs) / 2 + half]
    )
    assert "Finished trials: 1 of 1 asked." in (tmp_path / "report" / "tuning.md").read_text()


def test_repeats_are_checked():
    from omegaconf import OmegaConf

    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import repeat_overrides, repeats_problems

    cfg = OmegaConf.create({"seed": 0, "defense": {"finetune": {"rho": 1.0}}})
    assert repeats_problems({"seed": [0, 1]}, {"defense.finetune.rho": {}}, cfg) == []
    assert repeats_problems(
        {"sed": [0], "defense.finetune.rho": [1.0], "seed": []}, {"defense.finetune.rho": {}}, cfg
    ) == [
        "repeats key 'sed' is not a key of the composed config",
        "repeats key 'defense.finetune.rho' is also in search_space: it is one or the other",
        "repeats 'seed': [] must be a non-empty list of values",
    ]
    assert repeat_overrides({}) == [[]]
    assert repeat_overrides({"seed": [0, 1], "finetune.n": [10]}) == [
        ["seed=0", "finetune.n=10"],
        ["seed=1", "finetune.n=10"],
    ]


def test_the_pick_rule_against_hand_worked_trials():
    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import picked

    objectives = {"harmful_score": "minimize", "finetune_accuracy": "maximize"}
    trials = [
        (0, {"harmful_score": 40.0, "finetune_accuracy": 90.0}),
        (1, {"harmful_score": 20.0, "finetune_accuracy": 84.0}),
        (2, {"harmful_score": 30.0, "finetune_accuracy": 86.0}),
        (3, {"harmful_score": 10.0, "finetune_accuracy": 60.0}),
        (4, {"harmful_score": 30.0, "finetune_accuracy": 89.0}),
    ]

    def rule(margin):
        return {"best": "harmful_score", "within": {"finetune_accuracy": margin}}

    # FA >= 85: trials 0, 2, 4; 2 and 4 tie on HS 30: the higher FA (4, which dominates 2)
    assert picked(trials, objectives, rule(5.0)) == 4
    twin = [*trials, (5, {"harmful_score": 30.0, "finetune_accuracy": 89.0})]
    assert picked(twin, objectives, rule(5.0)) == 4  # a full tie: the earliest
    assert picked(trials, objectives, rule(6.0)) == 1  # FA >= 84 lets trial 1 in
    assert picked(trials, objectives, rule(0)) == 0  # only the best FA
    assert picked(trials, objectives, {"best": "harmful_score"}) == 3  # no margin: lowest HS
    assert picked(trials, objectives, {"best": "finetune_accuracy"}) == 0
    assert picked([], objectives, rule(5.0)) is None
    # two margins, each from its own best: no trial is within both (HS <= 15 and FA >= 85)
    both = {"best": "harmful_score", "within": {"finetune_accuracy": 5.0, "harmful_score": 5.0}}
    assert picked(trials, objectives, both) is None


def test_the_pick_rule_is_checked():
    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import pick_problems

    objectives = {"harmful_score": "minimize", "finetune_accuracy": "maximize"}
    assert pick_problems(None, objectives) == []
    assert (
        pick_problems({"best": "harmful_score", "within": {"finetune_accuracy": 5}}, objectives)
        == []
    )
    assert pick_problems(
        {"best": "hs", "within": {"fa": -1, "finetune_accuracy": True}, "margin": 1}, objectives
    ) == [
        "hydra.sweeper.pick.best='hs' must be one of the objectives "
        "['harmful_score', 'finetune_accuracy']",
        "hydra.sweeper.pick.within: 'fa' is not an objective",
        "hydra.sweeper.pick.within.fa=-1 must be a finite number >= 0",
        "hydra.sweeper.pick.within.finetune_accuracy=True must be a finite number >= 0",
        "hydra.sweeper.pick: unknown keys ['margin'] (best, within)",
    ]
    assert pick_problems("harmful_score", objectives) == [
        "hydra.sweeper.pick='harmful_score' must be a mapping {best: M, within: {M2: margin}}"
    ]
    assert pick_problems(
        {"best": "harmful_score", "within": ["finetune_accuracy"]}, objectives
    ) == ["hydra.sweeper.pick.within=['finetune_accuracy'] must be a mapping {M2: margin}"]
    assert pick_problems(
        {"best": "harmful_score", "within": {"finetune_accuracy": float("nan")}}, objectives
    ) == ["hydra.sweeper.pick.within.finetune_accuracy=nan must be a finite number >= 0"]


def test_tuning_json_is_rewritten_after_every_trial(tmp_path):
    """A study that runs for days can be read while it runs, and a killed one keeps what it
    finished: tuning.json holds every trial told before the launch that was killed."""
    from types import SimpleNamespace

    from omegaconf import open_dict

    from hydra_plugins.hfd_optuna_sweeper.optuna_sweeper import OptunaSweeper

    space = {"defense.finetune.rho": {"type": "float", "low": 0.1, "high": 10.0}}
    objectives = {"harmful_score": "minimize", "finetune_accuracy": "maximize"}
    sweeper = OptunaSweeper(space, objectives, 5, f"sqlite:///{tmp_path}/optuna.db", "tune")
    sweeper.config = compose_cfg(tmp_path, "experiment=tune_panacea_rho")
    with open_dict(sweeper.config):
        sweeper.config.hydra = {"sweep": {"dir": str(tmp_path)}}
    sweeper.validate_batch_is_legal = lambda batch: None  # no Hydra config loader here
    summary = tmp_path / "tuning.json"
    seen = []

    class Launcher:  # each launch finds the trials told so far; the third is killed
        def launch(self, batch, initial_job_idx):
            seen.append(len(json.loads(summary.read_text())["trials"]) if summary.exists() else 0)
            if len(seen) == 3:
                raise KeyboardInterrupt
            return [
                SimpleNamespace(return_value={"harmful_score": 50.0, "finetune_accuracy": 90.0})
            ]

    sweeper.launcher = Launcher()
    with pytest.raises(KeyboardInterrupt):
        sweeper.sweep([])
    assert seen == [0, 1, 2]
    assert [t["state"] for t in json.loads(summary.read_text())["trials"]] == ["COMPLETE"] * 2
