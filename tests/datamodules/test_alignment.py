"""The alignment stage's datamodule (datamodules/alignment.py), built by Hydra from conf/ as the run
builds it."""

from hydra.utils import instantiate

from datamodules.alignment import AlignmentDataModule
from datamodules.refusals import REFUSALS


def test_alignment_datamodule_serves_refusal_pairs_and_retain_data(
    tiny_cfg, offline_splits, tiny_formatter
):
    retain = [{"prompt": "p", "answer": "a", "is_harmful": False, "add_eos": False}]
    dm = instantiate(tiny_cfg().align.datamodule)(
        splits=offline_splits, formatter=tiny_formatter, retain=retain
    )
    assert isinstance(dm, AlignmentDataModule)
    refusal_pairs = dm.samples[:-1]
    assert len(refusal_pairs) == len(offline_splits.align_prompts) and dm.samples[-1] == retain[0]
    assert {s["answer"] for s in refusal_pairs} <= set(REFUSALS)
    assert [s["prompt"] for s in refusal_pairs] == [
        tiny_formatter.prompt(p) for p in offline_splits.align_prompts
    ]
    assert dm.defender_pairs == offline_splits.defender_pairs
