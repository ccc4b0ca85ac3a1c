"""Evaluation of a model: harmful score (HS, HS+) on held-out harmful prompts and fine-tuning
accuracy (FA) on the task's test examples; generations and verdicts are written as JSONL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from datamodules.evaluation import EvaluationDataModule
from evaluation.metrics import accuracy_metrics, harmful_score_by_source, judged_metrics
from evaluation.statistics import DEFAULT_LEVEL
from plumbing.distributed import is_main, map_shards
from plumbing.generation import generate_greedy
from plumbing.io import write_jsonl

log = logging.getLogger(__name__)

# Bump when what evaluate_model computes changes: cached evaluations of aligned models are keyed by it.
EVAL_VERSION = 4


def evaluate_model(
    model,
    data: EvaluationDataModule,
    judge,
    harmful_max_new_tokens: int,
    task_max_new_tokens: int,
    batch_size: int,
    generations_path: Path | None = None,
    tag: str = "",
    level: float = DEFAULT_LEVEL,
) -> dict:
    """HS / HS+ / FA / task refusal rate, each with its `level` interval over prompts (`*_ci`);
    the generations with their verdicts go to
    `generations_path` (JSONL). Under several processes every process calls this: each prompt is
    generated and judged by exactly one process, every process returns the same metrics, and
    rank 0 writes the file."""
    tokenizer = data.formatter.tokenizer
    harmful_prompts, task = data.harmful_prompts, data.task

    def answer_and_judge(
        prompts: list[str],
        max_new_tokens: int,
        what: str,
        judge_shard: Callable[[list[int], list[str]], list],
    ) -> list[tuple]:
        def on_shard(indices: list[int]) -> list[tuple]:
            continuations = generate_greedy(
                model,
                tokenizer,
                [prompts[i] for i in indices],
                max_new_tokens,
                batch_size,
                desc=f"{tag} {what}".strip(),
            )
            answers = [data.formatter.reply(c) for c in continuations]
            return list(zip(answers, *judge_shard(indices, answers)))

        return map_shards(list(range(len(prompts))), on_shard)

    harmful = answer_and_judge(
        data.harmful_inputs(),
        harmful_max_new_tokens,
        "harmful prompts",
        lambda idx, answers: [judge.judge_all([harmful_prompts[i] for i in idx], answers)],
    )
    harmful_answers = [a for a, _ in harmful]
    verdicts = [v for _, v in harmful]

    examples = data.task_examples
    judge_refusals = getattr(
        judge, "judge_refusals", judge.judge_all
    )  # a moderation model is not needed here

    def score_task(idx: list[int], answers: list[str]) -> list[list]:
        shard = [examples[i] for i in idx]
        return [
            task.score_all(answers, shard),
            judge_refusals([e.input or e.instruction for e in shard], answers),
        ]

    task_outputs = answer_and_judge(data.task_inputs(), task_max_new_tokens, "task", score_task)
    task_answers = [a for a, _, _ in task_outputs]
    correct = [c for _, c, _ in task_outputs]
    task_refused = [v.refused for _, _, v in task_outputs]  # over-refusal: benign questions refused

    metrics = {
        **judged_metrics(verdicts, task_refused, judge.name, level),
        **accuracy_metrics(correct, level),
        "harmful_score_by_source": harmful_score_by_source(verdicts, data.harmful_sources, level),
        "eval_split": data.split,
    }
    if generations_path is not None and is_main():
        rows = [
            {"kind": "harmful", "prompt": p, "source": s, "output": a, **v.as_dict()}
            for p, s, a, v in zip(harmful_prompts, data.harmful_sources, harmful_answers, verdicts)
        ] + [
            {
                "kind": "task",
                "prompt": e.input,
                "instruction": e.instruction,
                "output": a,
                "label": e.label,
                "extracted": task.extract(a),
                "correct": c,
                "refused": r,
            }
            for e, a, c, r in zip(examples, task_answers, correct, task_refused)
        ]
        write_jsonl(generations_path, rows)
    log.info(
        "%s HS=%.1f HS+=%.1f FA=%.1f task refusals=%.1f%%",
        tag,
        metrics["harmful_score"],
        metrics["harmful_score_plus"],
        metrics["finetune_accuracy"],
        metrics["task_refusal_rate"],
    )
    return metrics
