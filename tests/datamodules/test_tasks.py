"""The synthetic tasks (datamodules/tasks.py): ground truth, disjoint splits, answer extraction."""

import pytest

from datamodules.tasks import ArithmeticTask, SentimentTask


def test_sentiment_ground_truth_and_disjoint_splits():
    task = SentimentTask(n_train=500, n_test=100, seed=1)
    assert not {e.input for e in task.train} & {e.input for e in task.test}
    for e in task.train + task.test:
        last_clause = e.input.split(", but ")[-1]
        negated = " not " in f" {last_clause} "
        adjective_positive = any(f" {a}" in last_clause for a in SentimentTask.POSITIVE)
        expected = "positive" if adjective_positive and not negated else "negative"
        assert e.label == expected == e.answer, e.input


@pytest.mark.parametrize(
    "output,label",
    [
        ("positive", "positive"),
        ("Negative.", "negative"),
        ("The sentiment is negative", "negative"),
        ("positively negative", "negative"),
        ("I think it's Positive!", "positive"),
        ("neutral", None),
    ],
)
def test_sentiment_extraction(output, label):
    assert SentimentTask(n_train=5, n_test=5).extract(output) == label


@pytest.mark.parametrize(
    "output,number",
    [
        ("Sam has 3 + 4 = 7 apples. The final answer is: 7", "7"),
        ("The final answer is: 12. I counted 5 twice.", "12"),
        ("So 10 - 4 = 6", "6"),
        ("The final answer is:-3", "-3"),
        ("no idea", None),
    ],
)
def test_arithmetic_extraction(output, number):
    assert ArithmeticTask(n_train=5, n_test=5).extract(output) == number


def test_arithmetic_answers_are_exact():
    for e in ArithmeticTask(n_train=200, n_test=10).train:
        a, op, b = e.answer.split(" has ")[1].split(" = ")[0].split(" ")
        assert str(int(a) + int(b) if op == "+" else int(a) - int(b)) == e.label


@pytest.mark.parametrize("task_class", [SentimentTask, ArithmeticTask])
def test_test_examples_have_no_near_copy_in_the_train_split(task_class):
    """Distinct after normalization: "The movie was great." and "The movie was great!" cannot
    be one in the test split and the other in the train split."""
    from datamodules.harmful import normalize

    task = task_class()
    train = {normalize(e.input) for e in task.train}
    assert len(train) == len(task.train) and not train & {normalize(e.input) for e in task.test}
