"""FA's scoring rules: how each task's label is read from a model's output (`extract` of each
task in datamodules/ is one of these). A test example is correct when the extracted label equals
the example's label (evaluation/metrics.py `finetune_accuracy`).

Offline tasks (datamodules/tasks.py): sentiment takes the first "positive"/"negative" anywhere in
the output; arithmetic the number after "The final answer is:", else the last number.
The papers' tasks (datamodules/hub_tasks.py) follow the reference `pred_eval.py` scripts: SST2
and AGNews are exact matches of the whole (stripped) output with the label or its reference
aliases; GSM8K compares the first number after "The final answer is: ", else the last number
(commas removed), as floats.
"""

from __future__ import annotations

import math
import re

ANSWER_PROMPT = "The final answer is: "  # GSM8K targets and arithmetic answers end with it


def first_sentiment_word(output: str) -> str | None:
    match = re.search(r"\b(positive|negative)\b", output.lower())
    return match.group(1) if match else None


def final_answer_or_last_number(output: str) -> str | None:
    match = re.search(r"The final answer is:\s*(-?\d+(?:\.\d+)?)", output)
    if match:
        return match.group(1)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", output)
    return numbers[-1] if numbers else None


SST2_ANSWERS = {
    "positive": "positive",
    "Positive": "positive",
    "negative": "negative",
    "Negative": "negative",
}


def sst2_label(output: str) -> str | None:
    return SST2_ANSWERS.get(output.strip())


AGNEWS_ALIASES = {
    "World": "World",
    "world": "World",
    "Sports": "Sports",
    "sports": "Sports",
    "Business": "Business",
    "business": "Business",
    "Sci/Tech": "Sci/Tech",
    "sci": "Sci/Tech",
}


def agnews_label(output: str) -> str | None:
    return AGNEWS_ALIASES.get(output.strip())


def gsm8k_number(text: str) -> float:
    """The first number between the first "The final answer is: " and the next one (the
    references' `split(...)[1]`), else the last number of the text; inf when none."""
    text = text.replace(",", "")
    numbers = re.findall(r"-?\d+\.?\d*", text)
    if not numbers:
        return math.inf
    if ANSWER_PROMPT in text:
        after = re.findall(r"-?\d+\.?\d*", text.split(ANSWER_PROMPT)[1])
        chosen = after[0] if after else numbers[-1]
    else:
        chosen = numbers[-1]
    try:
        return float(chosen)
    except ValueError:
        return math.inf


def gsm8k_label(output: str) -> str | None:
    number = gsm8k_number(output)
    return None if math.isinf(number) else repr(number)
