"""Regenerate plumbing/assets/tiny_tokenizer.json, the small BPE of `model=tiny`.

    python -m scripts.make_tiny_tokenizer

Byte-level BPE (any text encodes) with 1024 tokens, trained on the project's own texts (tasks,
refusals) and the offline harmful data; ChatML special tokens as SmolLM2 has them.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from datamodules.harmful import build_harmful_splits
from datamodules.refusals import REFUSALS
from datamodules.tasks import ArithmeticTask, SentimentTask
from plumbing.models import TINY_TOKENIZER

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    texts = list(REFUSALS) + ["system", "user", "assistant", "Below is an instruction"]
    for task in (SentimentTask(n_train=500, n_test=10), ArithmeticTask(n_train=500, n_test=10)):
        texts += [f"{e.instruction}\n\n{e.input}\n{e.answer}" for e in task.train]
    splits = build_harmful_splits(
        "pkg:pyrit/datasets/jailbreak/many_shot_examples.json",
        [
            {
                "path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "format": "seed_yaml",
            }
        ],
        n_defender=1,
        n_align=1,
        n_eval=1,
    )
    texts += [p.prompt + "\n" + p.answer for p in splits.user_pairs + splits.defender_pairs]
    random.Random(0).shuffle(texts)
    return texts


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    TINY_TOKENIZER.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TINY_TOKENIZER))
    print(f"wrote {TINY_TOKENIZER} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
