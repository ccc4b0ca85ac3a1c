"""One run: align -> finetune -> post -> eval, each stage a function of the run's Experiment.

Each training stage and each evaluation is looked up in the stage cache first: a run that
differs only in what comes after a stage reuses it, and a killed run resumes from the cache.
Only rank 0 writes files.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from callbacks.diagnostics import SUMMARY
from evaluation.evaluate import EVAL_VERSION, evaluate_model
from evaluation.results import RESULTS, validate_results, write_results
from orchestration.experiment import Experiment, plain
from orchestration.stage_cache import config_key
from orchestration.sweep import claim_run_dir, point_key
from orchestration.tracking import Tracker, make_tracker
from orchestration.validation import validate_config
from plumbing import environment
from plumbing.distributed import broadcast, is_main, world_size
from plumbing.errors import InputError
from plumbing.models import load_adapter, save_adapter

log = logging.getLogger("run")
ADAPTER = "adapter.safetensors"
MODULE_STATE = "module_state.pt"
WHAT = {"align": "aligned", "finetune": "fine-tuned"}  # what a training stage's output is


def instantiate_with_run_objects(node, available: dict):
    """`instantiate(node)` plus the run's objects its class's constructor names; `available` maps
    each name to a function that makes the object (only the named ones are made)."""
    wanted = inspect.signature(get_class(node._target_)).parameters
    return instantiate(node, **{k: make() for k, make in available.items() if k in wanted})


def build_callbacks(exp: Experiment, stage: str) -> list:
    """The configured callbacks (conf/callbacks/) whose `stages` include `stage`. A callback gets,
    besides its config, the run's objects its constructor names: `folder` (the stage's
    <run>/<stage>_diagnostics), `evaluation_data` (held-out prompts and task test set), `judge`."""
    available = {
        "folder": lambda: exp.run_dir / f"{stage}_diagnostics",
        "evaluation_data": exp.evaluation_data,
        "judge": lambda: instantiate(exp.cfg.judge),
    }
    return [
        instantiate_with_run_objects(cb_cfg, available)
        for cb_cfg in (exp.cfg.get("callbacks") or {}).values()
        if cb_cfg is not None and stage in cb_cfg.stages
    ]


def stage_align(exp: Experiment, results: dict) -> None:
    """Base model + refusal data -> aligned adapter, cached under the alignment config's key."""
    entry, reused = trained_stage(
        exp,
        "align",
        exp.align_key(),
        exp.module(exp.cfg.align),
        exp.alignment_data,
        meta={
            "n_align": len(exp.splits.align_prompts),
            "model": exp.cfg.model.name,
            "n_retain": exp.cfg.data.n_retain,
        },
    )
    results.update(aligned_adapter=str(entry / ADAPTER), aligned_reused=reused)
    if (entry / "diagnostics" / SUMMARY).is_file():
        results["align_diagnostics"] = json.loads((entry / "diagnostics" / SUMMARY).read_text())
    if exp.cfg.eval.evaluate_aligned and "eval" in exp.cfg.stages:
        aligned = run_eval(exp, exp.run_dir / "generations_aligned.jsonl", tag="aligned")
        results.update({f"aligned_{k}": v for k, v in aligned.items()})


def stage_finetune(exp: Experiment, results: dict) -> None:
    """Aligned adapter + the user's poisoned set -> fine-tuned adapter: the same adapter trained on
    (finetune.adapter=continue), or a fresh one over the base with the aligned adapter merged (new).

    Cached like the alignment, under `Experiment.finetune_key`: runs that differ only after
    fine-tuning (a post transform's intensity, another judge or eval set) train it once."""
    results["finetune_adapter"] = exp.cfg.finetune.adapter
    if exp.cfg.finetune.adapter == "new":
        exp.new_adapter(seed=exp.cfg.finetune.seed)
    exp.finetune_module = exp.module(exp.cfg.finetune)  # a post transform may read its state
    entry, _ = trained_stage(
        exp, "finetune", exp.finetune_key(), exp.finetune_module, exp.finetune_data
    )
    results["finetuned_adapter_cached"] = str(entry / ADAPTER)
    if (entry / "diagnostics" / SUMMARY).is_file():
        results["finetune_diagnostics"] = json.loads((entry / "diagnostics" / SUMMARY).read_text())
    if is_main():
        save_adapter(exp.model, exp.run_dir / "adapters" / "finetuned.safetensors")


def trained_stage(
    exp: Experiment, stage: str, key: str, module, data: Callable, meta: dict | None = None
) -> tuple[Path, bool]:
    """The stage's cache entry (and whether it was found finished): the adapter, the module's own
    state (what its `on_save_checkpoint` adds, such as Panacea's ε) and the stage's diagnostics.

    Found: the adapter and the state are loaded into the model and `module`, and the diagnostics
    copied into the run directory. Else `module` is trained on `data()` (resuming from the stage's
    newest checkpoint) and the entry stored; parallel grid points wait for one training under the
    entry's lock, then reuse it."""
    diagnostics = exp.run_dir / f"{stage}_diagnostics"
    stage_cfg = exp.cfg[stage]

    def train() -> dict:
        if is_main():  # only this training's files go to the cache
            shutil.rmtree(diagnostics, ignore_errors=True)
        exp.fit(
            stage,
            module,
            data(),
            stage_cfg,
            build_callbacks(exp, stage),
            checkpoints=exp.cache.checkpoints(stage, key),
        )
        return module_state(module)  # on every process: it may gather shards

    def write(folder: Path, state: dict) -> None:
        save_adapter(exp.model, folder / ADAPTER)
        torch.save(state, folder / MODULE_STATE)
        if diagnostics.is_dir():  # the defense's figures, the probe's measurements
            shutil.copytree(diagnostics, folder / "diagnostics")

    entry, reused = exp.cached(
        stage,
        key,
        train,
        write,
        meta=lambda: {
            **(meta or {}),
            "config": plain(stage_cfg),
            "seconds": exp.timings[stage],
        },
    )
    if reused:
        load_adapter(exp.model, entry / ADAPTER)
        if (entry / MODULE_STATE).is_file():  # (alignments cached before 2026-11-24 have none)
            module.on_load_checkpoint(
                torch.load(entry / MODULE_STATE, map_location="cpu", weights_only=False)
            )
        if is_main() and (entry / "diagnostics").is_dir():
            shutil.copytree(entry / "diagnostics", diagnostics, dirs_exist_ok=True)
        exp.reused.append(stage)
    log.info("%s model %s %s", WHAT[stage], "reused from" if reused else "stored in", entry)
    return entry, reused


def module_state(module) -> dict:
    """What a finished training module holds besides the adapter (the entries its
    `on_save_checkpoint` adds: ε, λ_t, histories), as `on_load_checkpoint` takes it back."""
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    del checkpoint["state_dict"]
    return checkpoint


def stage_post(exp: Experiment, results: dict) -> None:
    """Fine-tuned adapter -> deployed adapter (a defense's transform; identity when post is null).

    With a transform and an eval stage, the fine-tuned model is also evaluated before it
    (`before_post_*` in results.json), so one run shows what the transform buys.
    """
    if exp.cfg.post is not None:
        transform = instantiate_with_run_objects(
            exp.cfg.post,
            {
                "defender_pairs": lambda: exp.splits.defender_pairs,
                "formatter": lambda: exp.formatter,
            },
        )
        if "eval" in exp.cfg.stages:
            before = run_eval(exp, exp.run_dir / "generations_before_post.jsonl", tag="before_post")
            results.update({f"before_post_{k}": v for k, v in before.items()})
        with exp.timed("post"):
            transform(exp.model, exp.finetune_module)
        if getattr(transform, "summary", None) is not None:
            results["post_summary"] = transform.summary
    if is_main():
        save_adapter(exp.model, exp.run_dir / "adapters" / "deployed.safetensors")


def stage_eval(exp: Experiment, results: dict) -> None:
    results.update(run_eval(exp, exp.run_dir / "generations_deployed.jsonl", tag="deployed"))


def run_eval(exp: Experiment, generations_path: Path, tag: str) -> dict:
    """HS/FA of the model as it is now, cached under its fingerprint and the evaluation's config:
    a run killed after an evaluation, or one whose model equals an evaluated one, does not
    generate again. The generations file is copied into the run directory either way."""
    cfg, e = exp.cfg, exp.cfg.eval
    key = config_key(
        {
            "model": exp.model_fingerprint(),
            "tag": tag,
            "version": EVAL_VERSION,
            "eval": plain(cfg.eval),
            "judge": plain(cfg.judge),
            "task": plain(cfg.task),
            "data": plain(cfg.data),
            "prompts": config_key({"prompts": exp.splits.eval_prompts}),
        }
    )

    def evaluate() -> dict:
        with exp.timed(f"eval_{tag}"):
            return evaluate_model(
                exp.model,
                exp.evaluation_data(),
                instantiate(cfg.judge),
                e.harmful_max_new_tokens,
                e.task_max_new_tokens,
                e.batch_size,
                generations_path=generations_path,
                tag=tag,
                level=e.interval_level,
            )

    def write(folder: Path, metrics: dict) -> None:
        shutil.copyfile(generations_path, folder / "generations.jsonl")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))

    entry, reused = exp.cached("eval", key, evaluate, write, meta={"tag": tag})
    if reused:
        exp.reused.append(f"eval_{tag}")
        if is_main():
            shutil.copyfile(entry / "generations.jsonl", generations_path)
    metrics = json.loads((entry / "metrics.json").read_text())
    # an entry written before the split existed is of the test split (the split is in the key)
    return {**metrics, "eval_split": metrics.get("eval_split", exp.eval_split())}


STAGE_FUNCTIONS = {
    "align": stage_align,
    "finetune": stage_finetune,
    "post": stage_post,
    "eval": stage_eval,
}


def defense_parts(cfg: DictConfig) -> dict[str, str | None]:
    """The class each stage's part of the defense runs (what a combination of parts really is)."""
    parts = {"align": cfg.defense.align, "finetune": cfg.defense.finetune, "post": cfg.defense.post}
    return {
        stage: part._target_.rpartition(".")[2] if part is not None else None
        for stage, part in parts.items()
    }


def claim(run_dir: Path, cfg: DictConfig) -> None:
    """`claim_run_dir` decided on rank 0, its refusal raised on every process. A claimed directory
    loses the results.json of a run before (unreadable, of an older schema, or about to be
    written again): results.json exists only where the latest run finished."""
    problem = None
    if is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            claim_run_dir(run_dir, cfg)
            (run_dir / RESULTS).unlink(missing_ok=True)
        except InputError as err:
            problem = str(err)
    problem = broadcast(problem)
    if problem:
        raise InputError(problem)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run; running it again with the same config (into any directory) resumes it: the
    finished stages and evaluations are found in the stage cache, and an unfinished training
    stage continues from its newest checkpoint there."""
    validate_config(cfg)
    exp = Experiment(cfg, run_dir)  # reads and checks all data before the model is loaded
    claim(run_dir, cfg)
    exp.load_model()
    if cfg.stages[0] != "align" and cfg.checkpoint != "base":
        load_adapter(exp.model, Path(cfg.checkpoint))
    results = {
        "defense": cfg.defense.name,
        "defense_parts": defense_parts(cfg),
        "stage_config": {
            stage: None if cfg[stage] is None else plain(cfg[stage])
            for stage in ("align", "finetune", "post")
        },
        "harmful_ratio": cfg.harmful_ratio,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "data": cfg.data.name,
        "stages": list(cfg.stages),
        "checkpoint": cfg.checkpoint,
        "n": cfg.finetune.datamodule.n,
        "n_harmful": exp.n_harmful,
        "n_benign": exp.n_benign,
        "n_align": len(exp.splits.align_prompts),
        "n_retain": cfg.data.n_retain,
        "n_defender": len(exp.splits.defender_pairs),
        "n_user_harmful_pool": len(exp.splits.user_pairs),
    }
    exp.tracker = make_tracker(cfg, run_dir) if is_main() else Tracker()
    try:
        for stage in cfg.stages:
            STAGE_FUNCTIONS[stage](exp, results)
        results["seconds"] = exp.timings
        results["reused"] = exp.reused
        results["resumed"] = exp.resumed
        results["run_dir"] = str(run_dir)
        results["point_key"] = point_key(cfg)
        results["processes"] = world_size()
        results["environment"] = environment.describe(exp.device)
        if "eval" in cfg.stages:
            results = validate_results(results)
            if is_main():
                write_results(run_dir / RESULTS, results)
        track_outputs(exp.tracker, results, run_dir)
    except BaseException:
        exp.tracker.close(failed=True)
        raise
    exp.tracker.close()
    return results


def track_outputs(tracker, results: dict, run_dir: Path) -> None:
    """Results, every generations file (with verdicts) and every figure of the run, to the tracker."""
    tracker.log_results(results)
    for path in sorted(run_dir.glob("generations_*.jsonl")):
        tracker.log_generations(path, tag=path.stem.removeprefix("generations_"))
    tracker.log_figures(sorted(run_dir.rglob("*.png")))
