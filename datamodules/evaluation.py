"""The evaluation's data: the held-out harmful prompts (HS) and the task's test examples (FA),
with the prompts the model is given (the model's template applied)."""

from __future__ import annotations

import lightning as L

from datamodules.formatting import PromptFormatter
from datamodules.tasks import Task, TaskExample


class EvaluationDataModule(L.LightningDataModule):
    """Built by Hydra from `eval.datamodule` (conf/config.yaml) with the run's held-out harmful
    prompts, task and formatter. n_task: how many of the task's test examples FA is measured on
    (the first n_task)."""

    def __init__(
        self,
        harmful_prompts: list[str],
        task: Task,
        formatter: PromptFormatter,
        n_task: int,
        harmful_sources: list[str] | None = None,
    ):
        super().__init__()
        self.harmful_prompts = list(harmful_prompts)
        # the source of each harmful prompt, for HS per source
        self.harmful_sources = list(harmful_sources or ["eval"] * len(self.harmful_prompts))
        self.task = task
        self.formatter = formatter
        self.task_examples: list[TaskExample] = task.test[:n_task]

    def harmful_inputs(self, prompts: list[str] | None = None) -> list[str]:
        """The harmful prompts (or a subset of them) as the model sees them."""
        return [
            self.formatter.prompt(p) for p in (self.harmful_prompts if prompts is None else prompts)
        ]

    def task_inputs(self) -> list[str]:
        return [self.formatter.prompt(e.instruction, e.input) for e in self.task_examples]
