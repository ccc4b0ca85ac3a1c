"""Text to token ids as the reference runs made them: `tokenizer(text)` with the tokenizer's own
leading special tokens (Llama and Gemma put BOS first; SmolLM2 and Qwen2 add nothing), used for
training and generation alike so that the two see the same prompt."""

from __future__ import annotations


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding starts with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return (
        with_special[:1] == [bos]
        and with_special != tokenizer("a", add_special_tokens=False)["input_ids"]
    )


def text_ids(tokenizer, text: str, bos: bool) -> list[int]:
    """The ids of `text`, with BOS first if `bos` (the tokenizer's `adds_bos`) and the text does not
    already begin with it (a chat template that writes it: a second BOS would be out of
    distribution)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and not text.startswith(tokenizer.bos_token):
        return [tokenizer.bos_token_id, *ids]
    return ids
