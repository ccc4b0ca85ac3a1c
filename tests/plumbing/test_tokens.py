"""Prompts are tokenized as the references' `tokenizer(text)` did, in training and generation
alike (plumbing/tokens.py): the tokenizer's BOS first where it adds one, never twice."""

import torch
from tokenizers import processors

from datamodules.formatting import IGNORE_INDEX, PromptFormatter
from plumbing.generation import generate_greedy
from plumbing.models import build_tiny, load_tiny_tokenizer
from plumbing.tokens import adds_bos, text_ids


def bos_tokenizer():
    """The tiny tokenizer made to put BOS first by default, as Llama's and Gemma's do."""
    tok = load_tiny_tokenizer()
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def test_bos_is_detected_from_the_default_encoding():
    assert not adds_bos(load_tiny_tokenizer())  # ChatML tokenizers (SmolLM2) add nothing
    assert adds_bos(bos_tokenizer())


def test_bos_comes_first_once():
    tok = bos_tokenizer()
    plain = tok("Hello there", add_special_tokens=False)["input_ids"]
    assert text_ids(tok, "Hello there", bos=True) == [tok.bos_token_id, *plain]
    assert text_ids(tok, "Hello there", bos=False) == plain
    written = tok.bos_token + "Hello"  # a chat template that writes BOS itself
    assert text_ids(tok, written, bos=True) == tok(written, add_special_tokens=False)["input_ids"]


def test_encode_is_the_joint_tokenization_with_the_prompt_masked():
    tok = bos_tokenizer()
    fmt = PromptFormatter(tok, "alpaca", max_length=256)
    prompt, answer = fmt.prompt("Say no."), "No thanks."
    enc = fmt.encode(prompt, answer)
    assert enc["input_ids"] == tok(prompt + answer)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])  # BOS included, as the references count it
    assert enc["labels"] == [IGNORE_INDEX] * n_prompt + enc["input_ids"][n_prompt:]
    chat = PromptFormatter(tok, "chat", max_length=256)  # its template starts with BOS's text
    chat_prompt = chat.prompt("Say no.")
    assert chat_prompt.startswith(tok.bos_token)
    written = tok(chat_prompt + answer, add_special_tokens=False)["input_ids"]
    assert chat.encode(chat_prompt, answer)["input_ids"] == written + [tok.eos_token_id]


class Recording(torch.nn.Module):
    """The tiny model, recording the ids generation is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def generate(self, input_ids, **kwargs):
        self.inputs.append(input_ids)
        return self.model.generate(input_ids=input_ids, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def test_generation_sees_the_prompt_as_training_encodes_it():
    model, _ = build_tiny(init_seed=3)
    tok = bos_tokenizer()
    fmt = PromptFormatter(tok, "alpaca", max_length=256)
    prompts = [fmt.prompt("Hi"), fmt.prompt("Explain the water cycle in detail")]
    recording = Recording(model)
    generate_greedy(recording, tok, prompts, 3, batch_size=2)
    (ids,) = recording.inputs
    for row, prompt in zip(ids.tolist(), sorted(prompts, key=len)):
        real = [t for t in row if t != tok.pad_token_id]  # left padding
        encoded = fmt.encode(prompt, "")
        assert real == [t for t, y in zip(encoded["input_ids"], encoded["labels"]) if y == -100]
