"""Prompt formatting, answer-only labels and batching (datamodules/formatting.py)."""

from datamodules.formatting import IGNORE_INDEX, collate


def test_labels_mask_the_prompt_and_keep_answer_plus_eos(tiny_formatter):
    prompt = tiny_formatter.prompt("Say no.", "now")
    enc = tiny_formatter.encode(prompt, "No thanks.")
    tok = tiny_formatter.tokenizer
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_ids = enc["labels"][n_prompt:]
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(answer_ids[:-1]) == "No thanks."
    assert enc["input_ids"][n_prompt:] == answer_ids


def test_truncation_keeps_prompt_and_cuts_the_answer(tiny_formatter):
    prompt = tiny_formatter.prompt("Tell a story.")
    enc = tiny_formatter.encode(prompt, "word " * 500)
    assert len(enc["input_ids"]) == tiny_formatter.max_length
    assert sum(label != IGNORE_INDEX for label in enc["labels"]) >= 1


def test_collate_pads_right_with_masked_labels():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "index": 0},
            {"input_ids": [5], "labels": [5], "index": 1},
        ],
        pad_id=2,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["index"].tolist() == [0, 1]
