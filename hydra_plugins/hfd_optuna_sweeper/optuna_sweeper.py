"""`hydra/sweeper=optuna`: tune a defense's hyperparameters with an Optuna study, every trial one
`run.py` point launched by the configured Hydra launcher (basic, joblib, submitit, slurm).

Why not hydra-optuna-sweeper: its last release (1.3.0) pins optuna < 3, and optuna 2.10 cannot
create a SQLite study with SQLAlchemy 2, which the rest of this stack installs. This sweeper
drives a current optuna through Hydra's own Sweeper interface instead (Hydra requires plugins to
live in the `hydra_plugins` package).

The study lives in SQLite (`storage`) under the sweep directory: running the same command again
continues it up to `n_trials` finished trials, and each trial's run directory is a grid point
like any other (a trial whose point finished before is read back, not rerun); a trial killed
with its sweep is asked again first with the same values, so its points resume. The objectives
are results.json metrics, each with its direction (default: lowest HS, highest FA, a
two-objective study whose Pareto front is written to <sweep>/tuning.json after every batch of
trials). With `repeats` (e.g. {seed: [0, 1, 2]}) a trial runs once per repeat and its values
are the means over them: on a model whose HS moves by tens of points with the seed, a single
run tunes to the noise. With `pick` (e.g. {best: harmful_score, within: {finetune_accuracy: 5}})
tuning.json also names the one trial a rule fixed before the study chooses (`picked`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from plumbing.io import atomic_write_text

log = logging.getLogger(__name__)
KINDS = ("float", "int", "categorical")


class OptunaSearchError(CompactHydraException):
    """A search that cannot run: Hydra prints the message alone (no traceback) and exits 1."""


DIRECTIONS = ("minimize", "maximize")


def settings_problems(n_trials, n_jobs, max_failures) -> list[str]:
    """The sweeper's own counts: each a whole number >= 1."""
    return [
        f"hydra.sweeper.{name}={value!r} must be a whole number >= 1"
        for name, value in (
            ("n_trials", n_trials),
            ("n_jobs", n_jobs),
            ("max_failures", max_failures),
        )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]


def search_space_problems(space: dict, config: DictConfig, objectives: dict) -> list[str]:
    """Every problem of a search space and its objectives, before anything runs or is written."""
    problems = []
    if not space:
        problems.append("hydra.sweeper.search_space is empty: name at least one key to tune")
    for key, spec in (space or {}).items():
        if OmegaConf.select(config, key, default="<missing>") == "<missing>":
            problems.append(
                f"search_space key '{key}' is not a key of the composed config (a typo, or a key of "
                "a defense part that this run does not use?)"
            )
        kind = (spec or {}).get("type")
        if kind not in KINDS:
            problems.append(f"search_space '{key}': type={kind!r} must be one of {list(KINDS)}")
        elif kind == "categorical" and not spec.get("choices"):
            problems.append(f"search_space '{key}': a categorical needs choices: [...]")
        elif kind != "categorical" and not (
            "low" in spec and "high" in spec and spec["low"] < spec["high"]
        ):
            problems.append(f"search_space '{key}': {kind} needs low < high")
    for metric, direction in (objectives or {}).items():
        if direction not in DIRECTIONS:
            problems.append(
                f"objective '{metric}': direction {direction!r} must be one of {DIRECTIONS}"
            )
    if not objectives:
        problems.append("hydra.sweeper.objectives is empty: e.g. {harmful_score: minimize}")
    return problems


def trial_config_problems(config: DictConfig, space: dict) -> list[str]:
    """The checks run.py makes before any model loads (orchestration/validation.py), on the
    config every trial runs: with each searched key at the start of its range (its first
    choice), then at each other end (each other choice), one key at a time. A bad fixed
    override, or a range the defense refuses, stops the study before it starts instead of
    failing `max_failures` trials first. Left to the trials: the GPU checks (the sweeper may run
    on a host that submits to others), checks that need the data (the evaluation split's size),
    and keys that name a config group (`judge`: Hydra composes the choice, not this check)."""
    from orchestration.validation import config_problems

    def ends(spec: dict) -> list:
        return (
            list(spec["choices"]) if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        )

    checkable = {
        key: spec
        for key, spec in space.items()
        if not OmegaConf.is_config(OmegaConf.select(config, key))
    }
    start = {key: ends(spec)[0] for key, spec in checkable.items()}

    def problems_at(values: dict) -> list[str]:
        trial = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(trial):
            trial.pop("hydra", None)  # Hydra's own node: not the run's config
        for key, value in values.items():
            OmegaConf.update(trial, key, value, merge=False)
        return config_problems(trial, hardware=False)

    at_start = problems_at(start)
    varied = {  # one key at a time to each of its other ends: (key, value) -> its problems
        (key, value): problems_at({**start, key: value})
        for key, spec in checkable.items()
        for value in ends(spec)[1:]
    }
    problems = []
    for problem in at_start:  # a problem one key's other end removes is that key's start's
        culprits = sorted({key for (key, _), found in varied.items() if problem not in found})
        at = ", ".join(f"{key}={start[key]}" for key in culprits)
        problems.append(f"with {at} (searched): {problem}" if culprits else problem)
    for (key, value), found in varied.items():
        problems += [
            f"with {key}={value} (searched): {problem}"
            for problem in found
            if problem not in at_start
        ]
    return problems


def repeats_problems(repeats: dict, space: dict, config: DictConfig) -> list[str]:
    """Each repeated key exists, is not also searched, and lists at least one value."""
    problems = []
    for key, values in (repeats or {}).items():
        if OmegaConf.select(config, key, default="<missing>") == "<missing>":
            problems.append(f"repeats key '{key}' is not a key of the composed config")
        if key in (space or {}):
            problems.append(f"repeats key '{key}' is also in search_space: it is one or the other")
        if not isinstance(values, (list, tuple)) or not values:
            problems.append(f"repeats '{key}': {values!r} must be a non-empty list of values")
    return problems


def pick_problems(pick, objectives: dict) -> list[str]:
    """`pick` is a mapping {best, within} that names objectives only, with finite margins >= 0."""
    if pick is None:
        return []
    if not isinstance(pick, dict):
        return [
            f"hydra.sweeper.pick={pick!r} must be a mapping {{best: M, within: {{M2: margin}}}}"
        ]
    problems = []
    if pick.get("best") not in (objectives or {}):
        problems.append(
            f"hydra.sweeper.pick.best={pick.get('best')!r} must be one of the objectives "
            f"{list(objectives or {})}"
        )
    within = pick.get("within") or {}
    if not isinstance(within, dict):
        problems.append(f"hydra.sweeper.pick.within={within!r} must be a mapping {{M2: margin}}")
        within = {}
    for metric, margin in within.items():
        if metric not in (objectives or {}):
            problems.append(f"hydra.sweeper.pick.within: '{metric}' is not an objective")
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not 0 <= margin < math.inf
        ):
            problems.append(
                f"hydra.sweeper.pick.within.{metric}={margin!r} must be a finite number >= 0"
            )
    unknown = set(pick) - {"best", "within"}
    if unknown:
        problems.append(f"hydra.sweeper.pick: unknown keys {sorted(unknown)} (best, within)")
    return problems


def picked(trials: list[tuple[int, dict]], objectives: dict, pick: dict) -> int | None:
    """The number of the trial `pick` chooses among finished `trials` ((number, {metric: mean})),
    or None when none passes: of those whose every `within` metric is within its margin of the
    best trial's value of it (best by its direction), the best by `best`'s direction; ties go to
    the better by the other objectives in their order, then to the earliest trial. So the pick is
    on the Pareto front: a trial dominating it would pass the margins and come first."""
    sign = {m: 1 if d == "minimize" else -1 for m, d in objectives.items()}  # lower is better
    kept = trials
    for metric, margin in (pick.get("within") or {}).items():
        best = min((sign[metric] * values[metric] for _, values in trials), default=0.0)
        kept = [t for t in kept if sign[metric] * t[1][metric] <= best + margin]
    if not kept:  # no trial yet, or (several margins) none within all of them at once
        return None
    order = [pick["best"], *(m for m in objectives if m != pick["best"])]
    return min(kept, key=lambda t: (*(sign[m] * t[1][m] for m in order), t[0]))[0]


def repeat_overrides(repeats: dict) -> list[list[str]]:
    """One override list per combination of the repeated values ([[]] without repeats)."""
    keys = list(repeats or {})
    return [
        [f"{k}={v}" for k, v in zip(keys, combo)]
        for combo in itertools.product(*(repeats[k] for k in keys))
    ]


def suggest(trial, space: dict) -> list[str]:
    """The trial's overrides, one per searched key."""
    overrides = []
    for key, spec in space.items():
        if spec["type"] == "float":
            value = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            value = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            value = trial.suggest_categorical(key, list(spec["choices"]))
        overrides.append(f"{key}={value}")
    return overrides


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        search_space: dict,
        objectives: dict,
        n_trials: int,
        storage: str,
        study_name: str,
        seed: int = 0,
        n_jobs: int = 1,
        max_failures: int = 3,
        repeats: dict | None = None,
        pick: dict | None = None,
    ):
        super().__init__()
        self.search_space = dict(search_space or {})
        self.objectives = dict(objectives or {})
        self.n_trials, self.storage, self.study_name = n_trials, storage, study_name
        self.seed, self.n_jobs, self.max_failures = seed, n_jobs, max_failures
        self.repeats = {k: list(v) for k, v in (repeats or {}).items()}
        if isinstance(pick, DictConfig):  # plain values: tuning.json writes the rule
            pick = OmegaConf.to_container(pick)
        self.pick = pick  # checked with the search space, before the study
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def fixed_overrides(self, arguments: list[str]) -> list[str]:
        parsed = OverridesParser.create().parse_overrides(arguments)
        swept = [o.input_line for o in parsed if o.is_sweep_override()]
        if swept:
            raise OptunaSearchError(
                f"hydra/sweeper=optuna takes fixed overrides only; {swept} sweep several values: "
                "put the key in hydra.sweeper.search_space instead"
            )
        return [o.input_line for o in parsed]

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        problems = settings_problems(self.n_trials, self.n_jobs, self.max_failures)
        problems += search_space_problems(self.search_space, self.config, self.objectives)
        problems += repeats_problems(self.repeats, self.search_space, self.config)
        problems += pick_problems(self.pick, self.objectives)
        if not problems:  # the space is sound: check what its trials would run
            problems += trial_config_problems(self.config, self.search_space)
        if problems:  # before the study or any run directory exists
            raise OptunaSearchError("invalid Optuna search:\n  - " + "\n  - ".join(problems))
        fixed = self.fixed_overrides(list(arguments))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            directions=list(self.objectives.values()),
            sampler=optuna.samplers.TPESampler(seed=self.seed),
            load_if_exists=True,
        )
        self.keep_pick_rule(study)
        # A trial left RUNNING was killed with its sweep: it fails, and its values are asked
        # again first, so its finished repeats are found done and its killed run resumes from
        # its stage checkpoints (same overrides, same point directories) instead of starting over.
        # Once only: values whose run kills the sweep itself (out of memory) would stall it.
        for stale in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            if stale.params and "retry_of" not in stale.user_attrs:
                study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
        # a continued study draws on from where it was, not the first trials' values again
        study.sampler = optuna.samplers.TPESampler(seed=self.seed + len(study.trials))
        failed_in_a_row = 0  # a cause every trial shares (a bad fixed override) ends the study
        while True:
            finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
            if finished >= self.n_trials:
                break
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - finished))]
            runs = repeat_overrides(self.repeats)  # each trial's points
            batch = [
                fixed + suggest(t, self.search_space) + extra for t in trials for extra in runs
            ]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number * len(runs))
            for i, trial in enumerate(trials):
                jobs = returns[i * len(runs) : (i + 1) * len(runs)]
                failed_in_a_row = 0 if self.tell(study, trial, jobs) else failed_in_a_row + 1
            # after every batch: a study that runs for days is read while it runs, or killed
            self.write_summary(study, sweep_dir / "tuning.json")
            if failed_in_a_row >= self.max_failures:
                raise OptunaSearchError(
                    f"the last {failed_in_a_row} trials failed (hydra.sweeper.max_failures="
                    f"{self.max_failures}): the study stops. Their errors are in the failed.json "
                    f"of their points in {sweep_dir}; fix the cause and run the same command "
                    "again to continue the study"
                )
        self.write_summary(study, sweep_dir / "tuning.json")
        return study

    def keep_pick_rule(self, study) -> None:
        """The pick rule is fixed when the study starts: a continued study with another rule
        stops (changing it after seeing the trials would make the pick a choice among them)."""
        rule = json.dumps(self.pick, sort_keys=True)
        if "pick" not in study.user_attrs:
            study.set_user_attr("pick", rule)
        elif study.user_attrs["pick"] != rule:
            raise OptunaSearchError(
                f"hydra.sweeper.pick={rule} differs from the rule the study {self.study_name} "
                f"started with ({study.user_attrs['pick']}): a pick rule is fixed before the "
                "trials are seen. Continue with that rule, or start a new study (another "
                "study_name or sweep directory)"
            )

    def tell(self, study, trial, jobs: list) -> bool:
        """Report the trial's objectives to the study, each the mean over its repeats (every
        repeat's values are kept in the trial's user attrs); False if any repeat failed."""
        import optuna

        values = []
        for job in jobs:
            try:
                results = job.return_value
            except Exception as err:  # the job raised: a failed trial, the study goes on
                log.error("trial %d failed: %s", trial.number, err)
                results = None
            if not results or any(results.get(m) is None for m in self.objectives):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return False
            values.append([float(results[m]) for m in self.objectives])
        trial.set_user_attr(
            "repeats", {"overrides": repeat_overrides(self.repeats), "values": values}
        )
        study.tell(trial, [statistics.fmean(column) for column in zip(*values)])
        return True

    def write_summary(self, study, path: Path) -> None:
        """Every trial and the best ones (the Pareto front with several objectives)."""
        import optuna

        def row(t):
            return {
                "number": t.number,
                "params": t.params,
                "values": t.values,
                "state": t.state.name,
                **({"repeats": t.user_attrs["repeats"]} if "repeats" in t.user_attrs else {}),
                **({"retry_of": t.user_attrs["retry_of"]} if "retry_of" in t.user_attrs else {}),
            }

        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        summary = {
            "study_name": self.study_name,
            "storage": self.storage,
            "objectives": self.objectives,
            "best": [row(t) for t in study.best_trials] if complete else [],
            "trials": [row(t) for t in study.trials],
        }
        if self.pick is not None:
            means = [(t.number, dict(zip(self.objectives, t.values))) for t in complete]
            number = picked(means, self.objectives, self.pick)
            summary["pick"] = self.pick
            summary["picked"] = None if number is None else row(study.trials[number])
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        log.info(
            "Optuna study %s: %d finished trials; best: %s%s",
            self.study_name,
            len(complete),
            summary["best"],
            f"; picked: {summary['picked']}" if "picked" in summary else "",
        )
