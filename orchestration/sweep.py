"""What makes a grid restartable and honest about failures.

- A point's identity is `point_key(cfg)`: the hash of its resolved config (less where the cache
  lives). `results.json` records it; a rerun of the grid skips a point whose results.json holds
  the same key, and redoes any other (unfinished, failed, or run with another config).
- A point that raises writes `failed.json` (error and traceback) instead, and the sweep goes on
  to the next point; the report shows it as failed, and `SweepSummary` makes the command exit
  non-zero at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from evaluation.results import RESULTS, read_results
from orchestration.stage_cache import config_key
from plumbing.io import atomic_write_text

log = logging.getLogger("run")
FAILED = "failed.json"
NOT_IDENTITY = ("cache_dir", "sweep_name")  # where files live, not what the point is


def short_hash(text: str) -> str:
    """8 hex digits naming a grid point's override set (directory names stay short and stable)."""
    return hashlib.sha256(str(text).encode()).hexdigest()[:8]


OmegaConf.register_new_resolver("short_hash", short_hash, replace=True)


def point_key(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return config_key({k: v for k, v in resolved.items() if k not in NOT_IDENTITY})


def finished(run_dir: Path, key: str) -> dict | None:
    """The saved results if this point already finished with this exact config, else None."""
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    try:
        results = read_results(path)
    except (
        json.JSONDecodeError,
        ValidationError,
    ):  # unreadable or of an older schema: redo the point
        return None
    return results if results.get("point_key") == key else None


def record_failure(run_dir: Path, err: BaseException) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        run_dir / FAILED,
        json.dumps(
            {
                "error": f"{type(err).__name__}: {err}",
                "traceback": "".join(traceback.format_exception(err)),
            },
            indent=2,
        )
        + "\n",
    )


def clear_failure(run_dir: Path) -> None:
    (run_dir / FAILED).unlink(missing_ok=True)


class SweepSummary(Callback):
    """At the end of a multirun: how many points finished, were skipped, failed; exit code 1 if any
    failed (so a job scheduler or CI sees it), after every point had its chance."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted(p.parent.name for p in sweep_dir.glob(f"*/{FAILED}"))
        done = len(list(sweep_dir.glob(f"*/{RESULTS}")))
        log.info(
            "sweep %s: %d points with results, %d failed%s",
            sweep_dir,
            done,
            len(failed),
            "".join(f"\n  failed: {name}" for name in failed),
        )
        print(
            f"sweep {sweep_dir}: {done} points with results, {len(failed)} failed; "
            f"table: python -m orchestration.sweep_report {sweep_dir}"
        )
        if failed:
            raise SystemExit(1)
