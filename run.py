"""Entry point: align -> finetune -> post -> eval (orchestration/stages.py), configured by Hydra (conf/).

python run.py defense=sft harmful_ratio=0.1
python run.py -m defense=sft harmful_ratio=0,0.1,0.2 seed=0,1
python run.py stages=[eval] checkpoint=outputs/RUN/adapters/deployed.safetensors
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from orchestration.stages import run
from orchestration.summary import print_summary
from orchestration.sweep import FAILED, clear_failure, finished, record_failure
from orchestration.validation import validate_config
from plumbing import distributed
from plumbing.distributed import broadcast, is_main
from plumbing.environment import share_cores
from plumbing.errors import InputError

log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """The run's results (what a sweeper such as hydra/sweeper=optuna reads its objectives from)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if not multirun:  # (a grid point's bad config is recorded as its failure instead)
            validate_config(cfg)  # before any process is started
        distributed.start(cfg.trainer, multirun)  # several processes: all of them run what follows
        launcher = HydraConfig.get().launcher
        if multirun and "joblib" in str(launcher.get("_target_", "")).lower():
            threads, cores = share_cores(launcher.get("n_jobs"))
            log.info(
                "%d torch threads for this point (%d cores, n_jobs=%s)",
                threads,
                cores,
                launcher.get("n_jobs"),
            )
        if multirun:
            return run_grid_point(cfg, run_dir)
        results = run(cfg, run_dir)
        if is_main():
            print_summary(results)
        return results
    except InputError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()


def run_grid_point(cfg: DictConfig, run_dir: Path) -> dict | None:
    """One point of a multirun: skipped if it finished before with the same config; a failure is
    recorded in failed.json and the sweep goes on (orchestration/sweep.py)."""
    done = broadcast(finished(run_dir, cfg))  # rank 0 decides, before anyone writes
    if is_main():  # an earlier failure (or another config's refusal) is not this attempt's
        clear_failure(run_dir)
    if done is not None:
        log.info("skipped %s: finished before with the same config", run_dir)
        return done
    try:
        results = run(cfg, run_dir)  # refuses a directory of another config before writing
    except Exception as err:
        if is_main():
            record_failure(run_dir, err)
        log.error("point failed (recorded in %s): %s", run_dir / FAILED, err)
        return None
    if is_main():
        print_summary(results)
    return results


if __name__ == "__main__":
    main()
