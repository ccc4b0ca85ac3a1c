"""Batched greedy generation: left padding, KV cache, prompts sorted by length."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from plumbing.tokens import adds_bos, text_ids


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
    with_finished: bool = False,
):
    """Greedy continuations of `prompts` (already templated), in the input order.

    Prompts are grouped by token length so that batches carry little padding; the outputs are
    identical to one-prompt-at-a-time generation (left padding + attention mask).
    with_finished: also return, per prompt, whether generation stopped at EOS (not at the cap).
    """
    if not prompts:
        return ([], []) if with_finished else []
    tokenizer.padding_side = "left"
    bos = adds_bos(tokenizer)
    ids = [text_ids(tokenizer, p, bos) for p in prompts]  # as the training stages encode them
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    outputs: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            idx = order[start : start + batch_size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            enc = enc.to(model.device)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            stopped = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
            for i, text, done in zip(idx, texts, stopped):
                outputs[i], finished[i] = text.strip(), done
    finally:
        model.train(was_training)
    return (outputs, finished) if with_finished else outputs
