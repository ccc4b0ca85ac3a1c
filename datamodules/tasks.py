"""The user's benign fine-tuning tasks, generated offline with exact ground truth.

A task gives disjoint train/test examples (instruction, input, answer, label) and extracts the
label from a model's output for fine-tuning accuracy (FA). The examples depend only on the
task's own seed, so the FA test set is the same for every run of a sweep. Examples are distinct
after normalization (case, punctuation, spacing), so no test example has a near-copy ("The movie
was great." / "The movie was great!") in the train split the user's set is drawn from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datamodules.harmful import normalize
from evaluation.task_scoring import final_answer_or_last_number, first_sentiment_word
from plumbing.errors import InputError


@dataclass(frozen=True)
class TaskExample:
    instruction: str
    input: str
    answer: str  # the training target
    label: str  # what FA compares the extracted output with


class Task:
    name = "task"
    instruction = ""

    def __init__(self, n_train: int = 2000, n_test: int = 200, seed: int = 1234):
        if n_train < 1 or n_test < 1:
            raise InputError(f"task.n_train and task.n_test must be >= 1 (got {n_train}, {n_test})")
        rng = random.Random(seed)
        pool: dict[str, TaskExample] = {}
        attempts = 0
        while len(pool) < n_train + n_test:
            attempts += 1
            if attempts > 50 * (n_train + n_test):
                raise InputError(
                    f"task '{self.name}' can generate only {len(pool)} distinct examples; "
                    f"lower task.n_train + task.n_test (asked {n_train + n_test})"
                )
            example = self.generate(rng)
            pool.setdefault(normalize(example.input), example)
        examples = list(pool.values())
        self.test = examples[:n_test]
        self.train = examples[n_test:]

    def generate(self, rng: random.Random) -> TaskExample:
        raise NotImplementedError

    def extract(self, output: str) -> str | None:
        """The label read from a model's output (one of evaluation/task_scoring.py's rules)."""
        raise NotImplementedError

    def is_correct(self, output: str, example: TaskExample) -> bool:
        return self.extract(output) == example.label

    def score_all(self, outputs: list[str], examples: list[TaskExample]) -> list[bool]:
        """FA's per-example decisions (a task judged by a model overrides this to batch it)."""
        return [self.is_correct(o, e) for o, e in zip(outputs, examples)]


class SentimentTask(Task):
    """SST2-like: short product/film reviews, answer 'positive' or 'negative'.

    Ground truth by construction: an adjective's polarity, flipped by 'not'; in 'A, but B'
    the clause after 'but' decides.
    """

    name = "sentiment"
    instruction = "Analyze the sentiment of the input, and respond only positive or negative."
    SUBJECTS = [
        "The movie",
        "This restaurant",
        "The new phone",
        "The hotel room",
        "This book",
        "The concert",
        "Our tour guide",
        "The customer service",
        "This laptop",
        "The soundtrack",
        "The coffee here",
        "The museum",
        "This video game",
        "The delivery",
        "The sequel",
        "The staff",
        "This camera",
        "The final episode",
        "The hiking trail",
        "The app",
    ]
    ASPECTS = [
        "the price",
        "the ending",
        "the design",
        "the service",
        "the plot",
        "the battery",
        "the food",
        "the acting",
        "the view",
        "the music",
    ]
    POSITIVE = [
        "wonderful",
        "excellent",
        "delightful",
        "fantastic",
        "great",
        "charming",
        "superb",
        "impressive",
        "enjoyable",
        "brilliant",
        "lovely",
        "satisfying",
        "outstanding",
        "pleasant",
    ]
    NEGATIVE = [
        "terrible",
        "awful",
        "boring",
        "disappointing",
        "dreadful",
        "mediocre",
        "frustrating",
        "poor",
        "horrible",
        "dull",
        "unpleasant",
        "annoying",
        "weak",
        "clumsy",
    ]
    INTENSIFIERS = ["", "really ", "truly ", "quite ", "absolutely ", "rather "]
    TAILS = [".", "!", " overall.", " from start to finish.", " in every way.", ", to be honest."]

    def _clause(self, rng: random.Random, subject: str) -> tuple[str, str]:
        positive = rng.random() < 0.5
        adjective = rng.choice(self.POSITIVE if positive else self.NEGATIVE)
        negated = (
            rng.random() < 0.2 and positive
        )  # 'not great' -> negative; 'not awful' is ambiguous
        label = "negative" if negated or not positive else "positive"
        verb = "was not" if negated else "was"
        return f"{subject} {verb} {rng.choice(self.INTENSIFIERS)}{adjective}", label

    def generate(self, rng: random.Random) -> TaskExample:
        subject = rng.choice(self.SUBJECTS)
        if rng.random() < 0.3:
            first, _ = self._clause(rng, subject)
            second, label = self._clause(rng, rng.choice(self.ASPECTS))
            text = f"{first}, but {second}{rng.choice(self.TAILS)}"
        else:
            clause, label = self._clause(rng, subject)
            text = clause + rng.choice(self.TAILS)
        return TaskExample(self.instruction, text, label, label)

    def extract(self, output: str) -> str | None:
        return first_sentiment_word(output)


class ArithmeticTask(Task):
    """GSM8K-like one-step word problems; the answer ends with 'The final answer is: N'.

    Extraction as the papers do for GSM8K: the number after 'The final answer is:', else the
    last number in the output.
    """

    name = "arithmetic"
    instruction = "Solve the math word problem. End with 'The final answer is: ' and the number."
    NAMES = ["Sam", "Maria", "Ken", "Aisha", "Leo", "Nora", "Ravi", "Emma", "Tom", "Yuki"]
    ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "cards"]

    def generate(self, rng: random.Random) -> TaskExample:
        name, item = rng.choice(self.NAMES), rng.choice(self.ITEMS)
        a, b = rng.randint(2, 60), rng.randint(1, 40)
        if rng.random() < 0.5:
            question = (
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            )
            result, work = a + b, f"{a} + {b} = {a + b}"
        else:
            a = a + b  # keep the result non-negative
            question = (
                f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
            )
            result, work = a - b, f"{a} - {b} = {a - b}"
        answer = f"{name} has {work} {item}. The final answer is: {result}"
        return TaskExample(self.instruction, question, answer, str(result))

    def extract(self, output: str) -> str | None:
        return final_answer_or_last_number(output)
