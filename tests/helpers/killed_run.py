"""`python tests/helpers/killed_run.py STAGE STEP [run.py overrides]`: run.py as a user runs it,
killed with SIGKILL (no clean-up, as the out-of-memory killer or a lost node does) once stage
STAGE has taken STEP optimizer steps and written that step's checkpoint. The config is untouched,
so running the same overrides again is the same run."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestration.experiment import Experiment  # noqa: E402


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # step STEP's checkpoint was written at its end
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    stage, step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    fit = Experiment.fit

    def fit_then_die(self, name, module, datamodule, stage_cfg, callbacks, checkpoints=None):
        if name == stage:
            callbacks = [*callbacks, KillAtStep(step)]
        return fit(self, name, module, datamodule, stage_cfg, callbacks, checkpoints)

    Experiment.fit = fit_then_die
    os.chdir(ROOT)
    sys.argv = [str(ROOT / "run.py"), *overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")  # as `python run.py` (Hydra finds conf/)


if __name__ == "__main__":
    main()
