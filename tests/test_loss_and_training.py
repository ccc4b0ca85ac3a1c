import lightning as L
import torch

from datamodules.formatting import IGNORE_INDEX, collate
from datamodules.supervised import SupervisedDataModule
from lightning_modules.causal_lm import CausalLMModule, answer_loss, answer_token_nll
from plumbing.models import add_lora, build_tiny


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


def test_answer_token_nll_matches_independent_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX],
                           [IGNORE_INDEX, 1, 2, 7, 8, 9]])
    sums, counts = answer_token_nll(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    expected = [0.0, 0.0]
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != IGNORE_INDEX:
                expected[b] -= logp[b, t, labels[b, t + 1]].item()
    assert counts.tolist() == [3, 5]
    torch.testing.assert_close(sums, torch.tensor(expected))
    torch.testing.assert_close(answer_loss(logits, labels), torch.tensor(sum(expected) / 8))


def test_loss_ignores_prompt_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]])
    changed = logits.clone()
    changed[:, :2] += 100 * torch.randn(1, 2, 11)  # positions predicting prompt tokens
    torch.testing.assert_close(answer_loss(logits, labels), answer_loss(changed, labels))


def test_collate_pads_right_with_masked_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "index": 0},
                     {"input_ids": [5], "labels": [5], "index": 1}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["index"].tolist() == [0, 1]


def test_training_changes_lora_only(tiny_formatter):
    base, _ = build_tiny()
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = [{"prompt": tiny_formatter.prompt(f"Question {i}?"), "answer": "positive",
                "is_harmful": False} for i in range(8)]
    dm = SupervisedDataModule(samples, tiny_formatter, batch_size=4, seed=0)
    module = CausalLMModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert changed == trainable  # every LoRA tensor moved, no base weight did
