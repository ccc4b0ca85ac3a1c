"""The evaluation stage's datamodule (datamodules/evaluation.py), built by Hydra from conf/ as the
run builds it."""

from hydra.utils import instantiate

from datamodules.evaluation import EvaluationDataModule


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
