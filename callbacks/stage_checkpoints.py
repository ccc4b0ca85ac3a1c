"""Checkpoints inside a training stage, so that a killed or preempted run resumes where it was.

`StageCheckpoints` saves every `every_n_steps` optimizer steps and after each epoch's last
step, into `folder`, keeping the newest `keep_last`. A checkpoint holds what the resumed stage
needs to continue exactly: the adapter tensors, optimizer and scheduler state, the loops'
progress with the position in the data mid-epoch (datamodules/resumable.py), every process's
RNG state and the defense's own state (the modules' `on_save_checkpoint`).

Each file is written under a temporary name and renamed into place, so a kill during a write
leaves no file under a checkpoint's name. `latest_checkpoint(folder)` returns the newest that
loads, and skips a corrupt one with a warning. The epoch-end checkpoint is taken in
`on_train_batch_end` of the epoch's last batch, not in `on_train_epoch_end`: Lightning resumes
exactly from the former, which is also where ModelCheckpoint(every_n_train_steps) saves.

Why not ModelCheckpoint: its step and epoch triggers cannot share one instance and one "keep
the newest K" rule, and it writes in place.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger("run")
PATTERN = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob("step-*.ckpt")
        if (m := PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest checkpoint in `folder` that loads; a corrupt or partial one is skipped (with a
    warning) for the one before it. None when there is none."""
    if folder is None or not Path(folder).is_dir():
        return None
    for path in checkpoints_newest_first(folder):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated, zeroed, not a torch file: any reason to skip it
            log.warning(
                "skipped checkpoint %s, which does not load (%s): trying the one before", path, err
            )
            continue
        if isinstance(checkpoint, dict) and "loops" in checkpoint and "state_dict" in checkpoint:
            return path
        log.warning("skipped checkpoint %s: not a training checkpoint of this framework", path)
    return None


def preemption_signal() -> signal.Signals:
    """The signal SLURM sends before the time limit or at preemption, as submitit asks for it
    (`--signal=USR2@90`; SUBMITIT_PREEMPT_SIGNAL overrides)."""
    return signal.Signals[
        "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")
    ]


class StageCheckpoints(Checkpoint):
    """Also, while the stage trains, the preemption signal is held until the step under way ends:
    then a checkpoint is saved (on every process, when any got the signal) and the handler that
    was there before runs, which for a submitit job (hydra/launcher=slurm or submitit_local)
    requeues it; the requeued job resumes from that checkpoint. Outside training the signal goes
    to that handler at once: finished stages and evaluations are in the stage cache."""

    def __init__(self, folder: Path, every_n_steps: int | None, keep_last: int):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._signal = preemption_signal()
        self._previous_handler = None
        self._received: tuple | None = None  # (signum, frame) of a signal held until the step ends

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self._previous_handler = signal.signal(self._signal, self._hold)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._previous_handler is not None:
            signal.signal(self._signal, self._previous_handler)
            self._previous_handler = None

    def _hold(self, signum, frame) -> None:
        self._received = (signum, frame)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        """Every process's torch RNG states, stacked by rank: dropout draws from them. A
        collective under DDP; every rank saves."""

        def by_rank(state: torch.Tensor) -> torch.Tensor:
            gathered = pl_module.all_gather(state.to(pl_module.device)).cpu()
            return gathered if trainer.world_size > 1 else gathered.unsqueeze(0)

        cuda = pl_module.device.type == "cuda"
        checkpoint["rng_states"] = {
            "cpu": by_rank(torch.get_rng_state()),
            "cuda": by_rank(torch.cuda.get_rng_state()) if cuda else None,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        """Each process gets its own RNG states back (Lightning restores this before the first
        resumed batch; the data replay does not draw from them)."""
        states, rank = checkpoint["rng_states"], trainer.global_rank

        def own(stacked: torch.Tensor) -> torch.Tensor:  # a fresh byte tensor: torch reads it raw
            return stacked[rank].to(torch.uint8).clone()

        torch.set_rng_state(own(states["cpu"]))
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(own(states["cuda"]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        epoch_end = batch_idx + 1 == trainer.num_training_batches
        periodic = self.every_n_steps is not None and step % self.every_n_steps == 0
        preempted = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        if step > 0 and (epoch_end or periodic or preempted):
            self.save(trainer, step)
        if preempted:
            log.warning(
                "%s: saved %s, now handing the signal on (requeue)",
                self._signal.name,
                checkpoint_name(step),
            )
            handler, received = self._previous_handler, self._received or (self._signal, None)
            self.on_train_end(trainer, pl_module)
            self._received = None
            if callable(handler):
                handler(*received)
            elif handler == signal.SIG_DFL:  # what the signal would have done: end the process
                signal.raise_signal(self._signal)

    def save(self, trainer: L.Trainer, step: int) -> None:
        """Every process takes part (the RNG states are gathered); rank 0 writes and prunes."""
        final = self.folder / checkpoint_name(step)
        temporary = self.folder / f".{final.name}.tmp"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(temporary)  # Lightning writes on rank 0 only
        if trainer.is_global_zero:
            os.replace(temporary, final)
            for old in checkpoints_newest_first(self.folder)[self.keep_last :]:
                old.unlink(missing_ok=True)
        trainer.strategy.barrier()
