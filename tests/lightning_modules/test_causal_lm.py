"""The answer-only loss (lightning_modules/causal_lm.py) against an independent computation, and
plain fine-tuning moving the LoRA weights only."""

import pytest
import torch

from datamodules.formatting import IGNORE_INDEX
from datamodules.supervised import SupervisedDataModule
from helpers.training import clipped, fit_steps
from lightning_modules.causal_lm import CausalLMModule, answer_loss, answer_token_nll
from plumbing.errors import InputError
from plumbing.models import add_lora, build_tiny


def test_answer_token_nll_matches_independent_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 7, 8, 9]]
    )
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


def test_training_changes_lora_only(tiny_formatter):
    base, _ = build_tiny()
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = [
        {
            "prompt": tiny_formatter.prompt(f"Question {i}?"),
            "answer": "positive",
            "is_harmful": False,
        }
        for i in range(8)
    ]
    dm = SupervisedDataModule(samples, tiny_formatter, batch_size=4, seed=0)
    module = CausalLMModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = fit_steps(module, dm, steps=-1, max_epochs=1)
    assert trainer.global_step == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert changed == trainable  # every LoRA tensor moved, no base weight did


def test_sft_step_clips_the_gradient_to_the_global_norm(tiny_formatter):
    """SGD(lr=1): the update is the gradient scaled to norm 0.05 (far below its own norm), the same
    as torch's clip_grad_norm_ over all LoRA tensors at once."""
    from functools import partial

    from helpers.training import tiny_lora

    model = tiny_lora()
    samples = [
        {
            "prompt": tiny_formatter.prompt(f"Review {i}"),
            "answer": "good" * (i + 1),
            "is_harmful": False,
        }
        for i in range(4)
    ]
    dm = SupervisedDataModule(samples, tiny_formatter, batch_size=4, seed=0)
    batch = next(iter(dm.train_dataloader()))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = answer_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert norm > 0.5  # the clip is active
    expected = clipped(grads, 0.05)
    before = {n: p.detach().clone() for n, p in params.items()}
    module = CausalLMModule(model, optimizer=partial(torch.optim.SGD, lr=1.0), max_grad_norm=0.05)
    fit_steps(module, dm, 1)
    update = {n: before[n] - p.detach() for n, p in params.items()}
    for n in params:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)
    assert torch.sqrt(sum((u**2).sum() for u in update.values())).item() == pytest.approx(
        0.05, rel=1e-4
    )


def test_max_grad_norm_must_be_positive():
    with pytest.raises(InputError, match="max_grad_norm=0"):
        CausalLMModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, max_grad_norm=0)
