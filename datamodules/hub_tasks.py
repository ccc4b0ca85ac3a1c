"""The papers' benign tasks, read from the hub (or local files in the hub's schema), with the
reference implementations' instructions, targets and exact-match scoring (Panacea / Booster
`*/build_dataset.py` and `*/pred_eval.py`):

- SST2 (`sst2`: train / validation, columns sentence, label): answer "positive" / "negative";
  correct when the whole output is "positive"/"Positive" (resp. negative), no substring match.
- AGNews (`ag_news`: train / test, columns text, label 0-3): answer World / Sports / Business /
  Sci/Tech; correct when the output is the label or its reference alias (world, sports,
  business, sci).
- GSM8K (`gsm8k`/main: train / test, columns question, answer): the target is the worked
  solution with "####" replaced by "The final answer is: "; the number compared is the first one
  after that phrase, else the last number (commas removed), as floats.

The user's benign samples are drawn from `train`; FA is measured on the first `n_test` rows of
the test split (the references use the first 1000; SST2's validation split has 872).
"""

from __future__ import annotations

from datamodules.hub import load_rows
from datamodules.tasks import Task, TaskExample
from evaluation.task_scoring import (
    ANSWER_PROMPT,
    agnews_label,
    gsm8k_label,
    gsm8k_number,
    sst2_label,
)
from plumbing.errors import InputError


class HubTask(Task):
    """A task whose examples are rows of a hub dataset; subclasses map a row to an example."""

    hub_name = ""
    hub_config: str | None = None
    train_split, test_split = "train", "test"
    columns: tuple[str, ...] = ()

    def __init__(
        self,
        n_train: int = 10000,
        n_test: int = 1000,
        train_path: str | None = None,
        test_path: str | None = None,
    ):
        if n_train < 1 or n_test < 1:
            raise InputError(f"task.n_train and task.n_test must be >= 1 (got {n_train}, {n_test})")
        train = load_rows(
            self.hub_name, self.train_split, train_path, self.hub_config, self.columns
        )
        test = load_rows(self.hub_name, self.test_split, test_path, self.hub_config, self.columns)
        if len(test) < n_test:
            raise InputError(
                f"task.n_test={n_test} but {self.hub_name} [{self.test_split}] has {len(test)} rows: "
                f"set task.n_test <= {len(test)}"
            )
        self.test = [self.example(row) for row in test[:n_test]]
        self.train = [self.example(row) for row in train[:n_train]]

    def example(self, row: dict) -> TaskExample:
        raise NotImplementedError


class SST2Task(HubTask):
    name = "sst2"
    hub_name = "sst2"
    train_split, test_split = "train", "validation"
    columns = ("sentence", "label")
    instruction = "Analyze the sentiment of the input, and respond only positive or negative"

    def example(self, row: dict) -> TaskExample:
        label = "negative" if row["label"] == 0 else "positive"
        return TaskExample(self.instruction, row["sentence"], label, label)

    def extract(self, output: str) -> str | None:
        return sst2_label(output)


AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


class AGNewsTask(HubTask):
    name = "agnews"
    hub_name = "ag_news"
    columns = ("text", "label")
    instruction = (
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        "World\nSports\nBusiness\nSci/Tech\n"
    )

    def example(self, row: dict) -> TaskExample:
        label = AGNEWS_LABELS[min(int(row["label"]), 3)]
        return TaskExample(self.instruction, row["text"], label, label)

    def extract(self, output: str) -> str | None:
        return agnews_label(output)


class GSM8KTask(HubTask):
    name = "gsm8k"
    hub_name = "gsm8k"
    hub_config = "main"
    columns = ("question", "answer")

    def example(self, row: dict) -> TaskExample:
        answer = row["answer"].replace("####", ANSWER_PROMPT)
        return TaskExample(row["question"], "", answer, repr(gsm8k_number(answer)))

    def extract(self, output: str) -> str | None:
        return gsm8k_label(output)


class AlpacaEvalTask(HubTask):
    """AlpacaEval as the Antibody reference uses it: tatsu-lab/alpaca_eval (config alpaca_eval,
    split eval: 805 instructions, each with a reference model's `output`). The first `n_train`
    (700) are the user's benign samples (instruction -> reference output), the next `n_test`
    (105) are evaluated; FA is the WIN RATE: the share of those on which `win_judge` prefers the
    model's answer to the reference output (the reference uses GPT-4 through the alpaca_eval tool;
    here any judge with `prefers(instructions, candidates, references)`, e.g. a reward model)."""

    name = "alpaca_eval"
    hub_name = "tatsu-lab/alpaca_eval"
    hub_config = "alpaca_eval"
    columns = ("instruction", "output")

    def __init__(
        self,
        n_train: int = 700,
        n_test: int = 105,
        path: str | None = None,
        win_judge=None,
    ):
        if n_train < 1 or n_test < 1:
            raise InputError(f"task.n_train and task.n_test must be >= 1 (got {n_train}, {n_test})")
        if win_judge is None:
            raise InputError(
                "task=alpaca_eval needs task.win_judge (a judge of model answer vs reference output)"
            )
        rows = load_rows(self.hub_name, "eval", path, self.hub_config, self.columns)
        if n_train + n_test > len(rows):
            raise InputError(
                f"task.n_train + task.n_test = {n_train + n_test} but {self.hub_name} has {len(rows)} rows"
            )
        self.train = [self.example(r) for r in rows[:n_train]]
        self.test = [self.example(r) for r in rows[n_train : n_train + n_test]]
        self.win_judge = win_judge

    def example(self, row: dict) -> TaskExample:
        return TaskExample(row["instruction"], "", row["output"], row["output"])

    def extract(self, output: str) -> str | None:
        return output.strip()

    def score_all(self, outputs: list[str], examples: list[TaskExample]) -> list[bool]:
        return self.win_judge.prefers(
            [e.instruction for e in examples], outputs, [e.answer for e in examples]
        )
