"""Evaluation of a model: harmful score (HS, HS+) on held-out harmful prompts and fine-tuning
accuracy (FA) on the task's test examples; generations and verdicts are written as JSONL."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datamodules.formatting import PromptFormatter
from datamodules.tasks import Task
from pipeline.generation import generate_greedy
from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)

# Bump when what evaluate_model computes changes: cached evaluations of aligned models are keyed by it.
EVAL_VERSION = 2


def evaluate_model(model, formatter: PromptFormatter, harmful_prompts: list[str], task: Task, judge,
                   n_task: int, harmful_max_new_tokens: int, task_max_new_tokens: int,
                   batch_size: int, generations_path: Path | None = None, tag: str = "") -> dict:
    tokenizer = formatter.tokenizer
    harmful_answers = generate_greedy(
        model, tokenizer, [formatter.prompt(p) for p in harmful_prompts],
        harmful_max_new_tokens, batch_size, desc=f"{tag} harmful prompts".strip(),
    )
    verdicts = judge.judge_all(harmful_prompts, harmful_answers)

    examples = task.test[:n_task]
    task_answers = generate_greedy(
        model, tokenizer, [formatter.prompt(e.instruction, e.input) for e in examples],
        task_max_new_tokens, batch_size, desc=f"{tag} task".strip(),
    )
    correct = [task.is_correct(a, e) for a, e in zip(task_answers, examples)]
    # over-refusal: benign task questions answered with a refusal
    task_refused = [v.refused for v in judge.judge_all([e.input for e in examples], task_answers)]

    metrics = {
        "harmful_score": 100.0 * sum(v.harmful for v in verdicts) / len(verdicts),
        "harmful_score_plus": 100.0 * sum(v.harmful_plus for v in verdicts) / len(verdicts),
        "finetune_accuracy": 100.0 * sum(correct) / len(correct),
        "task_refusal_rate": 100.0 * sum(task_refused) / len(task_refused),
        "n_eval_prompts": len(harmful_prompts),
        "n_task_eval": len(examples),
        "judge": judge.name,
    }
    if generations_path is not None:
        rows = [
            {"kind": "harmful", "prompt": p, "output": a, **v.as_dict()}
            for p, a, v in zip(harmful_prompts, harmful_answers, verdicts)
        ] + [
            {"kind": "task", "prompt": e.input, "output": a, "label": e.label,
             "extracted": task.extract(a), "correct": c, "refused": r}
            for e, a, c, r in zip(examples, task_answers, correct, task_refused)
        ]
        atomic_write_text(generations_path, "".join(json.dumps(r) + "\n" for r in rows))
    log.info("%s HS=%.1f HS+=%.1f FA=%.1f task refusals=%.1f%%", tag, metrics["harmful_score"],
             metrics["harmful_score_plus"], metrics["finetune_accuracy"], metrics["task_refusal_rate"])
    return metrics
