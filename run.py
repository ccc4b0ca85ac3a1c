"""Entry point: align -> finetune -> post -> eval, configured by Hydra (conf/).

    python run.py defense=sft harmful_ratio=0.1
    python run.py -m defense=sft harmful_ratio=0,0.1,0.2 seed=0,1
    python run.py stages=[eval] checkpoint=outputs/RUN/adapters/deployed.safetensors
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from callbacks.evaluation import evaluate_model  # noqa: E402
from datamodules.sft import alignment_samples, poisoned_samples  # noqa: E402
from pipeline import distributed  # noqa: E402
from pipeline.distributed import broadcast, is_main, world_size  # noqa: E402
from pipeline.experiment import Experiment, plain  # noqa: E402
from pipeline.io import atomic_write_text  # noqa: E402
from pipeline.models import load_adapter, save_adapter  # noqa: E402
from pipeline.report import print_summary  # noqa: E402
from pipeline.sweep import FAILED, RESULTS, clear_failure, finished, point_key, record_failure  # noqa: E402
from pipeline.tracking import Tracker, make_tracker  # noqa: E402
from pipeline.validation import InputError, validate_config  # noqa: E402

log = logging.getLogger("run")
ADAPTER = "adapter.safetensors"


def stage_align(exp: Experiment, results: dict) -> None:
    """Base model + refusal data -> aligned adapter, cached under the alignment config's key."""
    entry = align_once(exp, exp.align_key())
    load_adapter(exp.model, entry / ADAPTER)
    results.update(aligned_adapter=str(entry / ADAPTER), aligned_reused="align" not in exp.timings)
    if (entry / "diagnostics").is_dir():  # a cached alignment's diagnostics travel with it
        shutil.copytree(entry / "diagnostics", exp.run_dir / "align_diagnostics", dirs_exist_ok=True)
        results["align_diagnostics"] = json.loads((entry / "diagnostics" / "summary.json").read_text())
    if exp.cfg.eval.evaluate_aligned and "eval" in exp.cfg.stages:
        results.update({f"aligned_{k}": v for k, v in evaluate_aligned(exp).items()})


def align_once(exp: Experiment, key: str) -> Path:
    """The cache entry of the aligned adapter: looked up, or trained and stored (parallel grid
    points wait for one alignment under the entry's lock, then reuse it)."""
    module = None

    def train() -> None:
        nonlocal module
        samples = alignment_samples(exp.splits, exp.formatter, exp.retain_samples())
        module = exp.module(exp.cfg.align)
        exp.fit("align", module, exp.datamodule(samples, exp.cfg.align), exp.cfg.align)

    def write(folder: Path, _) -> None:
        save_adapter(exp.model, folder / ADAPTER)
        write_diagnostics(module, folder / "diagnostics")

    entry = exp.cached("align", key, train, write, meta=lambda: {
        "n_align": len(exp.splits.align_prompts), "model": exp.cfg.model.name, "n_retain": exp.cfg.data.n_retain,
        "config": plain(exp.cfg.align), "seconds": exp.timings["align"]})
    log.info("aligned model written to %s" if module else "reused aligned model from %s", entry)
    return entry


def evaluate_aligned(exp: Experiment) -> dict:
    """HS/FA of the aligned model, cached next to it (keyed by alignment + evaluation config)."""
    generations = exp.run_dir / "generations_aligned.jsonl"

    def write(folder: Path, metrics: dict) -> None:
        shutil.copyfile(generations, folder / "generations.jsonl")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    entry = exp.cached("aligned_eval", exp.aligned_eval_key(), lambda: run_eval(exp, generations, tag="aligned"),
                       write, meta={"align_key": exp.align_key()})
    if is_main():
        shutil.copyfile(entry / "generations.jsonl", generations)
    return json.loads((entry / "metrics.json").read_text())


def stage_finetune(exp: Experiment, results: dict) -> None:
    """Aligned adapter + the user's poisoned set -> fine-tuned adapter (the same adapter, trained on)."""
    cfg = exp.cfg
    samples = poisoned_samples(exp.task, exp.splits, exp.formatter, cfg.finetune.n,
                               cfg.harmful_ratio, cfg.finetune.sample_seed)
    exp.finetune_module = exp.module(cfg.finetune)
    exp.fit("finetune", exp.finetune_module, exp.datamodule(samples, cfg.finetune), cfg.finetune)
    if is_main():
        save_adapter(exp.model, exp.run_dir / "adapters" / "finetuned.safetensors")
        summary = write_diagnostics(exp.finetune_module, exp.run_dir / "finetune_diagnostics")
        if summary is not None:
            results["finetune_diagnostics"] = summary


def write_diagnostics(module, folder: Path) -> dict | None:
    """A defense module's diagnostics (CSV/PNG, see its `write_diagnostics`) and their summary."""
    if not hasattr(module, "write_diagnostics"):
        return None
    summary = module.write_diagnostics(folder)
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def stage_post(exp: Experiment, results: dict) -> None:
    """Fine-tuned adapter -> deployed adapter (a defense's transform; identity when post is null).

    With a transform and an eval stage, the fine-tuned model is also evaluated before it
    (`before_post_*` in results.json), so one run shows what the transform buys.
    """
    if exp.cfg.post is not None:
        transform = instantiate(exp.cfg.post)
        if "eval" in exp.cfg.stages:
            before = run_eval(exp, exp.run_dir / "generations_before_post.jsonl", tag="before_post")
            results.update({f"before_post_{k}": v for k, v in before.items()})
        with exp.timed("post"):
            transform(exp)
    if is_main():
        save_adapter(exp.model, exp.run_dir / "adapters" / "deployed.safetensors")


def stage_eval(exp: Experiment, results: dict) -> None:
    results.update(run_eval(exp, exp.run_dir / "generations_deployed.jsonl", tag="deployed"))


def run_eval(exp: Experiment, generations_path: Path, tag: str) -> dict:
    e = exp.cfg.eval
    with exp.timed(f"eval_{tag}"):
        return evaluate_model(
            exp.model, exp.formatter, exp.splits.eval_prompts, exp.task, instantiate(exp.cfg.judge),
            e.n_task, e.harmful_max_new_tokens, e.task_max_new_tokens, e.batch_size,
            generations_path=generations_path, tag=tag,
        )


STAGE_FUNCTIONS = {"align": stage_align, "finetune": stage_finetune, "post": stage_post, "eval": stage_eval}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate_config(cfg)
    exp = Experiment(cfg, run_dir)  # reads and checks all data before the model is loaded
    run_dir.mkdir(parents=True, exist_ok=True)
    exp.load_model()
    if cfg.stages[0] != "align" and cfg.checkpoint != "base":
        load_adapter(exp.model, Path(cfg.checkpoint))
    results = {
        "defense": cfg.defense.name, "harmful_ratio": cfg.harmful_ratio, "seed": cfg.seed,
        "model": cfg.model.name, "task": cfg.task.name, "stages": list(cfg.stages),
        "checkpoint": cfg.checkpoint, "n": cfg.finetune.n, "n_harmful": exp.n_harmful,
        "n_benign": exp.n_benign, "n_align": len(exp.splits.align_prompts),
        "n_retain": cfg.data.n_retain, "n_defender": len(exp.splits.defender_pairs),
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
        if "eval" in cfg.stages and is_main():
            atomic_write_text(run_dir / RESULTS, json.dumps(results, indent=2) + "\n")
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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if not multirun:  # (a grid point's bad config is recorded as its failure instead)
            validate_config(cfg)  # before any process is started
        distributed.start(cfg.trainer, multirun)  # several processes: all of them run what follows
        if multirun:
            return run_grid_point(cfg, run_dir)
        results = run(cfg, run_dir)
    except InputError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if is_main():
        print_summary(results)
    return results.get("harmful_score")


def run_grid_point(cfg: DictConfig, run_dir: Path) -> float | None:
    """One point of a multirun: skipped if it finished before with the same config; a failure is
    recorded in failed.json and the sweep goes on (pipeline/sweep.py)."""
    done = broadcast(finished(run_dir, point_key(cfg)))  # rank 0 decides, before anyone writes
    if done is not None:
        log.info("skipped %s: finished before with the same config", run_dir)
        return done.get("harmful_score")
    if is_main():
        clear_failure(run_dir)
        (run_dir / RESULTS).unlink(missing_ok=True)  # a stale result of another config
    try:
        results = run(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the grid goes on
        if is_main():
            record_failure(run_dir, err)
        log.error("point failed (recorded in %s): %s", run_dir / FAILED, err)
        return None
    if is_main():
        print_summary(results)
    return results.get("harmful_score")


if __name__ == "__main__":
    main()
