"""The alignment stage's data: harmful prompts paired with refusals (or the data's own safe
answers), the retain data, and the defender's harmful pairs for defenses that align against them."""

from __future__ import annotations

from datamodules.formatting import PromptFormatter
from datamodules.harmful import HarmfulSplits
from datamodules.refusals import refusal_for
from datamodules.supervised import SupervisedDataModule


def alignment_samples(
    splits: HarmfulSplits, formatter: PromptFormatter, retain: list[dict] = ()
) -> list[dict]:
    """Each alignment prompt paired with its safe answer from the data (BeaverTails), else with
    one of the project's refusals, plus the retain samples (benign instruction -> the base
    model's own answer; see datamodules/retain.py)."""
    answers = splits.align_answers or [refusal_for(i) for i in range(len(splits.align_prompts))]
    return [
        {"prompt": formatter.prompt(p), "answer": a, "is_harmful": False}
        for p, a in zip(splits.align_prompts, answers, strict=True)
    ] + list(retain)


class AlignmentDataModule(SupervisedDataModule):
    """Built by Hydra from `align.datamodule` (conf/config.yaml) with the run's splits, formatter
    and retain samples. batch_size, seed: the alignment stage's (its data order)."""

    def __init__(
        self,
        splits: HarmfulSplits,
        formatter: PromptFormatter,
        retain: list[dict],
        batch_size: int,
        seed: int,
    ):
        super().__init__(
            alignment_samples(splits, formatter, retain),
            formatter,
            batch_size,
            seed,
            defender_pairs=splits.defender_pairs,
        )
