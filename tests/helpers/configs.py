"""The real config tree (conf/) composed and shrunk to the tiny model with small data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")

# The tiny model with small data: every stage in a few seconds.
TINY = [
    "model=tiny",
    "~logger",
    "data.n_align=16",
    "data.n_retain=4",
    "data.retain_max_new_tokens=6",
    "data.n_eval=6",
    # no held-out prompts beyond n_eval (`++`: a data= without these keys, e.g. beavertails, still composes)
    "++data.n_eval_remainder=0",
    "++data.heldout_sources=[]",
    "finetune.n=20",
    "align.epochs=1",
    "finetune.epochs=1",
    "eval.n_task=6",
    "eval.harmful_max_new_tokens=6",
    "eval.task_max_new_tokens=3",
    "eval.batch_size=4",
    "task.n_train=200",
    "task.n_test=20",
    "align.optimizer.lr=1e-2",
    "finetune.optimizer.lr=1e-2",
]


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])


def compose_tracked(tmp_path: Path, *overrides: str):
    """The tiny config with a logger (TINY itself removes it)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[o for o in TINY if o != "~logger"]
            + [f"cache_dir={tmp_path / 'cache'}", *overrides],
        )


def run_tiny(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python run.py *args` on the tiny config as a user would type it (a separate process),
    with the stage cache under tmp_path; output captured."""
    return subprocess.run(
        [sys.executable, "run.py", *args, *TINY, f"cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
