"""One run: align -> finetune -> post -> eval, each stage a function of the run's Experiment.

The alignment (and the aligned model's evaluation) is looked up in the stage cache first: a run
that differs only in what comes after alignment reuses it. Only rank 0 writes files.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from callbacks.diagnostics import SUMMARY
from evaluation.evaluate import evaluate_model
from evaluation.results import RESULTS, validate_results, write_results
from orchestration.experiment import Experiment, plain
from orchestration.sweep import point_key
from orchestration.tracking import Tracker, make_tracker
from orchestration.validation import validate_config
from plumbing import environment
from plumbing.distributed import is_main, world_size
from plumbing.models import load_adapter, save_adapter

log = logging.getLogger("run")
ADAPTER = "adapter.safetensors"


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
    entry = align_once(exp, exp.align_key())
    load_adapter(exp.model, entry / ADAPTER)
    results.update(aligned_adapter=str(entry / ADAPTER), aligned_reused="align" not in exp.timings)
    if (entry / "diagnostics").is_dir():  # a cached alignment's diagnostics travel with it
        shutil.copytree(
            entry / "diagnostics", exp.run_dir / "align_diagnostics", dirs_exist_ok=True
        )
        results["align_diagnostics"] = json.loads((entry / "diagnostics" / SUMMARY).read_text())
    if exp.cfg.eval.evaluate_aligned and "eval" in exp.cfg.stages:
        results.update({f"aligned_{k}": v for k, v in evaluate_aligned(exp).items()})


def align_once(exp: Experiment, key: str) -> Path:
    """The cache entry of the aligned adapter: looked up, or trained and stored (parallel grid
    points wait for one alignment under the entry's lock, then reuse it)."""
    trained = False
    diagnostics = exp.run_dir / "align_diagnostics"

    def train() -> None:
        nonlocal trained
        if is_main():  # only this alignment's files go to the cache
            shutil.rmtree(diagnostics, ignore_errors=True)
        exp.fit(
            "align",
            exp.module(exp.cfg.align),
            exp.alignment_data(),
            exp.cfg.align,
            build_callbacks(exp, "align"),
        )
        trained = True

    def write(folder: Path, _) -> None:
        save_adapter(exp.model, folder / ADAPTER)
        if (diagnostics / SUMMARY).is_file():
            shutil.copytree(diagnostics, folder / "diagnostics")

    entry = exp.cached(
        "align",
        key,
        train,
        write,
        meta=lambda: {
            "n_align": len(exp.splits.align_prompts),
            "model": exp.cfg.model.name,
            "n_retain": exp.cfg.data.n_retain,
            "config": plain(exp.cfg.align),
            "seconds": exp.timings["align"],
        },
    )
    log.info("aligned model written to %s" if trained else "reused aligned model from %s", entry)
    return entry


def evaluate_aligned(exp: Experiment) -> dict:
    """HS/FA of the aligned model, cached next to it (keyed by alignment + evaluation config)."""
    generations = exp.run_dir / "generations_aligned.jsonl"

    def write(folder: Path, metrics: dict) -> None:
        shutil.copyfile(generations, folder / "generations.jsonl")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))

    entry = exp.cached(
        "aligned_eval",
        exp.aligned_eval_key(),
        lambda: run_eval(exp, generations, tag="aligned"),
        write,
        meta={"align_key": exp.align_key()},
    )
    if is_main():
        shutil.copyfile(entry / "generations.jsonl", generations)
    return json.loads((entry / "metrics.json").read_text())


def stage_finetune(exp: Experiment, results: dict) -> None:
    """Aligned adapter + the user's poisoned set -> fine-tuned adapter: the same adapter trained on
    (finetune.adapter=continue), or a fresh one over the base with the aligned adapter merged (new)."""
    results["finetune_adapter"] = exp.cfg.finetune.adapter
    if exp.cfg.finetune.adapter == "new":
        exp.new_adapter(seed=exp.cfg.finetune.seed)
    exp.finetune_module = exp.module(exp.cfg.finetune)
    exp.fit(
        "finetune",
        exp.finetune_module,
        exp.finetune_data(),
        exp.cfg.finetune,
        build_callbacks(exp, "finetune"),
    )
    if is_main():
        save_adapter(exp.model, exp.run_dir / "adapters" / "finetuned.safetensors")
        summary = exp.run_dir / "finetune_diagnostics" / SUMMARY
        if summary.is_file():
            results["finetune_diagnostics"] = json.loads(summary.read_text())


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
    e = exp.cfg.eval
    with exp.timed(f"eval_{tag}"):
        return evaluate_model(
            exp.model,
            exp.evaluation_data(),
            instantiate(exp.cfg.judge),
            e.harmful_max_new_tokens,
            e.task_max_new_tokens,
            e.batch_size,
            generations_path=generations_path,
            tag=tag,
            level=e.interval_level,
        )


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


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate_config(cfg)
    exp = Experiment(cfg, run_dir)  # reads and checks all data before the model is loaded
    run_dir.mkdir(parents=True, exist_ok=True)
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
    exp.tracker = make_tracker(cfg) if is_main() else Tracker()
    try:
        for stage in cfg.stages:
            STAGE_FUNCTIONS[stage](exp, results)
        results["seconds"] = exp.timings
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
