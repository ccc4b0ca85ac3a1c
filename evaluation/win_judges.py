"""Judges of "is the model's answer better than the reference answer" for AlpacaEval's win rate.

`prefers(instructions, candidates, references) -> list[bool]`. The reference implementations use
GPT-4 through the `alpaca_eval` tool, which cannot run here; `RewardModelWinJudge` scores both
answers with a reward model from the hub and counts a win when the candidate scores higher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evaluation.moderation_judges import judge_device, load_failed


class RewardModelWinJudge:
    """scorer: (instructions, answers) -> scores; None loads `model_name` (a sequence-classification
    reward model with one logit, e.g. OpenAssistant/reward-model-deberta-v3-large-v2)."""

    name = "reward_model"

    def __init__(
        self,
        model_name: str = "OpenAssistant/reward-model-deberta-v3-large-v2",
        path: str | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        scorer: Callable[[list[str], list[str]], torch.Tensor] | None = None,
    ):
        self.source, self.batch_size, self.max_length, self.scorer = (
            path or model_name,
            batch_size,
            max_length,
            scorer,
        )

    def _load(self) -> Callable[[list[str], list[str]], torch.Tensor]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.source)
            model = AutoModelForSequenceClassification.from_pretrained(self.source).eval()
        except OSError as err:
            raise load_failed(self.source, err, path_key="task.win_judge.path") from err
        model = model.to(judge_device())

        @torch.no_grad()
        def score(instructions: list[str], answers: list[str]) -> torch.Tensor:
            out = []
            for start in range(0, len(answers), self.batch_size):
                enc = tokenizer(
                    instructions[start : start + self.batch_size],
                    answers[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(model.device)
                out.append(model(**enc).logits[:, 0].float().cpu())
            return torch.cat(out) if out else torch.zeros(0)

        return score

    def prefers(
        self, instructions: list[str], candidates: list[str], references: list[str]
    ) -> list[bool]:
        if self.scorer is None:
            self.scorer = self._load()
        ours, theirs = self.scorer(instructions, candidates), self.scorer(instructions, references)
        return [bool(a > b) for a, b in zip(ours, theirs)]
