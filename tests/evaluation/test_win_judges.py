"""The win-rate judge (evaluation/win_judges.py) on AlpacaEval's fixture file, with a stub reward
model."""

import pytest
import torch

from helpers.hub import HUB, alpaca
from plumbing.errors import InputError


def test_alpaca_eval_win_rate_with_a_stub_reward_model():
    from datamodules.hub_tasks import AlpacaEvalTask
    from evaluation.win_judges import RewardModelWinJudge

    judge = RewardModelWinJudge(
        scorer=lambda instructions, answers: torch.tensor([float(len(a)) for a in answers])
    )
    task = AlpacaEvalTask(
        n_train=8, n_test=3, path=str(HUB / "alpaca_eval_eval.jsonl"), win_judge=judge
    )
    assert (
        len(task.train) == 8
        and task.test[0].instruction == "Write a short note about topic number 8."
    )
    assert alpaca().prompt(task.test[0].instruction, task.test[0].input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWrite a short note about topic number 8.\n\n### Response:\n"
    )
    assert task.train[0].answer == "Here is a short note about topic 0: it matters."
    reference = task.test[0].answer
    # longer than the reference wins under this stub; equal or shorter loses (a win must be strict)
    assert task.score_all([reference + " More.", reference, "Short."], task.test) == [
        True,
        False,
        False,
    ]
    with pytest.raises(InputError, match="has 12 rows"):
        AlpacaEvalTask(
            n_train=10, n_test=3, path=str(HUB / "alpaca_eval_eval.jsonl"), win_judge=judge
        )
    with pytest.raises(InputError, match="needs task.win_judge"):
        AlpacaEvalTask(path=str(HUB / "alpaca_eval_eval.jsonl"))
