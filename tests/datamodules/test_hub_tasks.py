"""The papers' tasks offline (datamodules/hub_tasks.py): loaders on small files in each hub
dataset's schema (tests/fixtures/hub), the exact prompt strings, answer extraction."""

import math

import pytest

from datamodules.hub_tasks import AGNewsTask, GSM8KTask, SST2Task
from evaluation.task_scoring import gsm8k_number
from helpers.hub import alpaca, task
from plumbing.errors import InputError


def test_task_splits_come_from_the_hub_splits():
    sst2 = task(SST2Task, "sst2", "validation", n_test=4)
    assert len(sst2.train) == 24 and len(sst2.test) == 4
    assert [e.label for e in sst2.test] == ["positive", "negative", "positive", "positive"]
    agnews = task(AGNewsTask, "ag_news", n_test=4)
    assert [e.label for e in agnews.test] == ["Business", "Sci/Tech", "Sci/Tech", "Sports"]
    with pytest.raises(InputError, match="task.n_test=5 but sst2 \\[validation\\] has 4 rows"):
        task(SST2Task, "sst2", "validation", n_test=5)


def test_prompt_strings_byte_for_byte():
    fmt = alpaca()
    sst2 = task(SST2Task, "sst2", "validation", n_test=1).test[0]
    assert fmt.prompt(sst2.instruction, sst2.input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAnalyze the sentiment "
        "of the input, and respond only positive or negative\n\n### Input:\nit 's a charming and often affecting "
        "journey . \n\n### Response:\n"
    )
    assert sst2.answer == "positive"
    news = task(AGNewsTask, "ag_news", n_test=1).test[0]
    assert fmt.prompt(news.instruction, news.input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nCategorize the news "
        "article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n\n\n"
        "### Input:\nFears for T N pension after talks Unions representing workers at Turner Newall say they "
        "are 'disappointed'.\n\n### Response:\n"
    )
    math_problem = task(GSM8KTask, "gsm8k_main", n_test=2).test[1]
    assert fmt.prompt(math_problem.instruction, math_problem.input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nA robe takes 2 bolts of blue fiber and half that much white fiber. How "
        "many bolts in total does it take?\n\n### Response:\n"
    )
    assert math_problem.answer == (
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is "
        "2+1=<<2+1=3>>3 bolts of fabric\nThe final answer is:  3"
    )
    assert math_problem.label == "3.0"


def test_answer_extraction_on_tricky_outputs():
    gsm8k = task(GSM8KTask, "gsm8k_main")
    josh = gsm8k.test[2]  # "#### 70000" after "70,000"s
    assert josh.label == "70000.0"
    assert gsm8k.is_correct("He made 200,000-130,000=$70,000.\nThe final answer is: 70,000", josh)
    assert gsm8k.is_correct(
        "The final answer is: 70000 dollars, not 5", josh
    )  # first number after the phrase
    assert not gsm8k.is_correct("The final answer is: 5. Or 70000", josh)
    assert gsm8k.is_correct("so 130000 spent and 70000 profit", josh)  # no phrase: the last number
    assert (
        gsm8k_number("12 and 18. The final answer is: unknown") == 18.0
    )  # phrase, no number after: last
    assert gsm8k_number("The final answer is: about 12 or 18") == 12.0
    # only up to a second "The final answer is: ", then the last number of the whole text
    assert gsm8k_number("The final answer is: none. The final answer is: 7, or 9") == 9.0
    assert (
        gsm8k_number("The final answer is: -3.50") == -3.5 and gsm8k_number("no digits") == math.inf
    )
    assert gsm8k.extract("no digits at all") is None

    sst2 = task(SST2Task, "sst2", "validation", n_test=2)
    positive, negative = sst2.test[0], sst2.test[1]
    assert sst2.is_correct("Positive", positive) and sst2.is_correct("  positive\n", positive)
    assert not sst2.is_correct("positive.", positive) and not sst2.is_correct(
        "It is positive", positive
    )
    assert sst2.is_correct("negative", negative) and not sst2.is_correct("POSITIVE", positive)

    agnews = task(AGNewsTask, "ag_news", n_test=2)
    business, scitech = agnews.test
    assert agnews.is_correct("business", business) and agnews.is_correct("Sci/Tech", scitech)
    assert agnews.is_correct("sci", scitech) and not agnews.is_correct("Sci/Tech.", scitech)
    assert not agnews.is_correct("tech", scitech)
