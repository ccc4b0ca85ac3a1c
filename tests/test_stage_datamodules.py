"""The three datamodules of a run, built by Hydra from conf/ as the run builds them."""

import pytest
from hydra.utils import instantiate

from datamodules.alignment import AlignmentDataModule
from datamodules.evaluation import EvaluationDataModule
from datamodules.poisoned import PoisonedFinetuneDataModule
from datamodules.refusals import REFUSALS
from datamodules.tasks import SentimentTask


@pytest.fixture(scope="module")
def task():
    return SentimentTask(n_train=300, n_test=50, seed=1234)


@pytest.mark.parametrize("ratio,expected", [(0, 0), (0.1, 3), (0.25, 8), (0.5, 15), (1.0, 30)])
def test_harmful_ratio_from_the_command_line_becomes_exact_harmful_count(
        tiny_cfg, task, offline_splits, tiny_formatter, ratio, expected):
    cfg = tiny_cfg(f"harmful_ratio={ratio}", "finetune.n=30")
    dm = instantiate(cfg.finetune.datamodule)(task=task, splits=offline_splits, formatter=tiny_formatter)
    assert isinstance(dm, PoisonedFinetuneDataModule) and dm.harmful_ratio == ratio
    assert len(dm.samples) == 30 and sum(s["is_harmful"] for s in dm.samples) == expected  # round(0.25*30)=8
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == cfg.finetune.batch_size
    assert len(dm.defender_items()) == len(offline_splits.defender_pairs)


def test_alignment_datamodule_serves_refusal_pairs_and_retain_data(tiny_cfg, offline_splits, tiny_formatter):
    retain = [{"prompt": "p", "answer": "a", "is_harmful": False, "add_eos": False}]
    dm = instantiate(tiny_cfg().align.datamodule)(splits=offline_splits, formatter=tiny_formatter, retain=retain)
    assert isinstance(dm, AlignmentDataModule)
    refusal_pairs = dm.samples[:-1]
    assert len(refusal_pairs) == len(offline_splits.align_prompts) and dm.samples[-1] == retain[0]
    assert {s["answer"] for s in refusal_pairs} <= set(REFUSALS)
    assert [s["prompt"] for s in refusal_pairs] == [tiny_formatter.prompt(p) for p in offline_splits.align_prompts]
    assert dm.defender_pairs == offline_splits.defender_pairs


def test_evaluation_datamodule_holds_held_out_prompts_and_test_examples(tiny_cfg, task, offline_splits, tiny_formatter):
    cfg = tiny_cfg("eval.n_task=7")
    dm = instantiate(cfg.eval.datamodule)(harmful_prompts=offline_splits.eval_prompts, task=task,
                                          formatter=tiny_formatter)
    assert isinstance(dm, EvaluationDataModule)
    assert dm.harmful_prompts == offline_splits.eval_prompts and dm.task_examples == task.test[:7]
    assert dm.harmful_inputs() == [tiny_formatter.prompt(p) for p in offline_splits.eval_prompts]
    assert dm.task_inputs()[0] == tiny_formatter.prompt(task.test[0].instruction, task.test[0].input)
