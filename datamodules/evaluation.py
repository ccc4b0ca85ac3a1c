"""The evaluation's data: the held-out harmful prompts (HS) and the task's test examples (FA),
with the prompts the model is given (the model's template applied).

Two splits, disjoint from each other and from every training role:
- `test` (the default): the data's held-out prompts and the task's first `n_task` test examples;
- `validation`: the data's validation prompts and the task's next `n_task` test examples. Tune a
  hyperparameter here and report it on `test`: a value picked on the test prompts has its
  score raised by the pick (experiment=tune_panacea_rho does this).
"""

from __future__ import annotations

import lightning as L

from datamodules.formatting import PromptFormatter
from datamodules.tasks import Task, TaskExample
from plumbing.errors import InputError

SPLITS = ("test", "validation")


def split_problems(split, n_task: int, n_task_test: int, n_validation_prompts: int) -> list[str]:
    """What keeps `split` from being evaluated (checked before the model loads)."""
    if split not in SPLITS:
        return [f"eval.datamodule.split={split!r} must be one of {list(SPLITS)}"]
    if split == "test":
        return []
    problems = []
    if n_validation_prompts == 0:
        problems.append(
            "eval.datamodule.split=validation needs validation prompts (the prompt sources' "
            "prompts in no other role) and this data config has none: lower data.n_align or "
            "data.n_eval_remainder to leave some (data=beavertails has no validation split), "
            "or evaluate on the test split"
        )
    if n_task_test < 2 * n_task:
        problems.append(
            f"eval.datamodule.split=validation takes the task's test examples after the first "
            f"eval.n_task={n_task} (those are the test split): task.n_test={n_task_test} must be "
            f"at least {2 * n_task}; raise it or lower eval.n_task"
        )
    return problems


class EvaluationDataModule(L.LightningDataModule):
    """Built by Hydra from `eval.datamodule` (conf/config.yaml) with the run's held-out harmful
    prompts, validation prompts, task and formatter. n_task: how many of the task's test examples
    FA is measured on. split: test | validation (module docstring)."""

    def __init__(
        self,
        harmful_prompts: list[str],
        task: Task,
        formatter: PromptFormatter,
        n_task: int,
        harmful_sources: list[str] | None = None,
        split: str = "test",
        validation_prompts: list[str] = (),
    ):
        super().__init__()
        problems = split_problems(split, n_task, len(task.test), len(validation_prompts))
        if problems:
            raise InputError("; ".join(problems))  # a run checks this before its model loads
        self.split = split
        self.task = task
        self.formatter = formatter
        if split == "test":
            self.harmful_prompts = list(harmful_prompts)
            # the source of each harmful prompt, for HS per source
            self.harmful_sources = list(harmful_sources or ["eval"] * len(self.harmful_prompts))
            self.task_examples: list[TaskExample] = task.test[:n_task]
        else:
            self.harmful_prompts = list(validation_prompts)
            self.harmful_sources = ["validation"] * len(self.harmful_prompts)
            self.task_examples = task.test[n_task : 2 * n_task]

    def harmful_inputs(self, prompts: list[str] | None = None) -> list[str]:
        """The harmful prompts (or a subset of them) as the model sees them."""
        return [
            self.formatter.prompt(p) for p in (self.harmful_prompts if prompts is None else prompts)
        ]

    def task_inputs(self) -> list[str]:
        return [self.formatter.prompt(e.instruction, e.input) for e in self.task_examples]
