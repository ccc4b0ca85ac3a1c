"""Experiment tracking for one run (one grid point): the Lightning logger of each training stage,
then the results, the generations with the judge's verdicts, and the figures.

`logger=csv` / `logger=tensorboard`: one Lightning logger per stage (`<run_dir>/logs/<stage>`);
results, generations and figures stay as files in the run directory.
`logger=wandb`: ONE W&B run per grid point, grouped by sweep (`group: ${sweep_name}`), holding
the resolved config, every stage's metrics (prefixed by stage), the results as summary, the
generations as tables and the figures as images. Offline with `WANDB_MODE=offline` (no API
key). The run is finished in every case, with a non-zero exit code when the point failed.
`~logger`: nothing is logged.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from plumbing.io import atomic_write_text, read_jsonl

log = logging.getLogger("run")
WANDB_ID = "wandb_run_id"


class Tracker:
    """The no-op base: `~logger`."""

    def stage_logger(self, stage: str):
        return False

    def log_results(self, results: dict) -> None:
        pass

    def log_generations(self, path: Path, tag: str) -> None:
        pass

    def log_figures(self, paths: list[Path]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class LightningLoggerTracker(Tracker):
    """CSV or TensorBoard: a logger per stage, `version=<stage>`."""

    def __init__(self, logger_cfg: DictConfig):
        self.logger_cfg = logger_cfg

    def stage_logger(self, stage: str):
        return instantiate(self.logger_cfg, version=stage)


class WandbTracker(Tracker):
    """A run resumed into the same run directory continues the same W&B run: its id is kept in
    `<run_dir>/wandb_run_id` (W&B's resume="allow"; offline, `wandb sync` merges the parts)."""

    def __init__(self, logger_cfg: DictConfig, cfg: DictConfig, run_dir: Path):
        import wandb

        kwargs = OmegaConf.to_container(logger_cfg, resolve=True)
        kwargs.pop("_target_")
        offline = kwargs.pop("offline", False)
        save_dir = Path(kwargs.pop("save_dir"))
        save_dir.mkdir(parents=True, exist_ok=True)
        id_file = Path(run_dir) / WANDB_ID
        if not id_file.is_file():
            atomic_write_text(id_file, uuid.uuid4().hex[:8])  # a W&B run id: [a-z0-9]
        run_id = id_file.read_text().strip()
        self.run = wandb.init(
            dir=str(save_dir),
            mode="offline" if offline else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
            id=run_id,
            resume="allow",
            **kwargs,
        )
        log.info("W&B run %s (%s)", self.run.name, self.run.dir)

    def stage_logger(self, stage: str):
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run, prefix=stage)

    def log_results(self, results: dict) -> None:
        flat = {
            k: v for k, v in results.items() if isinstance(v, (int, float, str, bool)) or v is None
        }
        for group in ("seconds", "align_diagnostics", "finetune_diagnostics"):
            flat.update({f"{group}/{k}": v for k, v in (results.get(group) or {}).items()})
        for key, interval in results.items():  # [low, high] intervals as two numbers
            if key.endswith("_ci") and interval:
                flat[f"{key}_low"], flat[f"{key}_high"] = interval
        self.run.summary.update(flat)

    def log_generations(self, path: Path, tag: str) -> None:
        import wandb

        rows = read_jsonl(path)
        if not rows:
            return
        columns = sorted(
            {k for row in rows for k in row},
            key=lambda k: (k not in ("kind", "prompt", "output"), k),
        )
        table = wandb.Table(
            columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows]
        )
        self.run.log({f"generations/{tag}": table})

    def log_figures(self, paths: list[Path]) -> None:
        import wandb

        images = {f"figures/{p.stem}": wandb.Image(str(p)) for p in paths if p.is_file()}
        if images:
            self.run.log(images)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _cell(value):
    return (
        value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    )


def make_tracker(cfg: DictConfig, run_dir: Path) -> Tracker:
    logger_cfg = cfg.get("logger")
    if not logger_cfg:
        return Tracker()
    if get_class(logger_cfg._target_).__name__ == "WandbLogger":
        return WandbTracker(logger_cfg, cfg, run_dir)
    return LightningLoggerTracker(logger_cfg)
