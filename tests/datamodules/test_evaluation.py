"""The evaluation stage's datamodule (datamodules/evaluation.py), built by Hydra from conf/ as the
run builds it."""

import pytest
from hydra.utils import instantiate

from datamodules.evaluation import EvaluationDataModule
from plumbing.errors import InputError


def test_evaluation_datamodule_holds_held_out_prompts_and_test_examples(
    tiny_cfg, task, offline_splits, tiny_formatter
):
    cfg = tiny_cfg("eval.n_task=7")
    dm = instantiate(cfg.eval.datamodule)(
        harmful_prompts=offline_splits.eval_prompts, task=task, formatter=tiny_formatter
    )
    assert isinstance(dm, EvaluationDataModule)
    assert dm.harmful_prompts == offline_splits.eval_prompts and dm.task_examples == task.test[:7]
    assert dm.harmful_inputs() == [tiny_formatter.prompt(p) for p in offline_splits.eval_prompts]
    assert dm.task_inputs()[0] == tiny_formatter.prompt(
        task.test[0].instruction, task.test[0].input
    )


def test_the_validation_split_is_disjoint_from_the_test_split(
    tiny_cfg, task, offline_splits, tiny_formatter
):
    """split=validation: the data's validation prompts and the task's next n_task test examples,
    so a value tuned there is reported on prompts and examples it was not picked on."""
    cfg = tiny_cfg("eval.n_task=7", "+eval.datamodule.split=validation")
    dm = instantiate(cfg.eval.datamodule)(
        harmful_prompts=offline_splits.eval_prompts,
        validation_prompts=offline_splits.validation_prompts,
        task=task,
        formatter=tiny_formatter,
    )
    assert dm.split == "validation"
    assert dm.harmful_prompts == offline_splits.validation_prompts
    assert set(dm.harmful_sources) == {"validation"}
    assert dm.task_examples == task.test[7:14]
    assert not set(dm.harmful_prompts) & set(offline_splits.eval_prompts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "dev"}, r"eval.datamodule.split='dev' must be one of \['test', 'validation'\]"),
        ({"split": "validation", "n_task": 26}, "task.n_test=50 must be at least 52"),
        ({"split": "validation", "validation_prompts": []}, "this data config has none"),
    ],
)
def test_a_split_that_cannot_be_evaluated_is_refused(
    task, offline_splits, tiny_formatter, kwargs, message
):
    args = {
        "harmful_prompts": offline_splits.eval_prompts,
        "validation_prompts": offline_splits.validation_prompts,
        "task": task,
        "formatter": tiny_formatter,
        "n_task": 7,
        **kwargs,
    }
    with pytest.raises(InputError, match=message):
        EvaluationDataModule(**args)
