"""Panacea's step pinned against an independent computation on the tiny model (the setup and the
independent computation are in tests/helpers/panacea.py)."""

import pytest
import torch

from datamodules.formatting import collate
from helpers.panacea import RHO, independent_update, setup
from helpers.training import fit_steps as fit
from lightning_modules.gradients import global_norm


@pytest.mark.parametrize("clamp", [None, 100.0, 0.1])
def test_step_equals_independent_gradient(tiny_formatter, clamp):
    model, dm, module = setup(tiny_formatter, clamp=clamp)
    user_batch = next(iter(dm.train_dataloader()))
    harmful_batch = collate(
        [
            {**tiny_formatter.encode(tiny_formatter.prompt(p.prompt), p.answer)}
            for p in dm.defender_pairs
        ],
        pad_id=tiny_formatter.tokenizer.pad_token_id,
    )
    expected_grad, expected_eps = independent_update(model, user_batch, harmful_batch, clamp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = fit(module, dm, steps=1)
    assert trainer.global_step == 1
    for n, p in model.named_parameters():
        if p.requires_grad:  # SGD with lr = 1: w_after = w_before - grad
            torch.testing.assert_close(
                before[n] - p.detach(), expected_grad[n], rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(module.epsilon[n], expected_eps[n], rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(before[n], p.detach())
    assert global_norm(list(module.epsilon.values())).item() == pytest.approx(RHO, rel=1e-5)


def test_weights_restored_exactly_when_the_optimizer_does_not_move(tiny_formatter):
    model, dm, module = setup(tiny_formatter, lr=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(module, dm, steps=1)
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert module.epsilon and all(e.abs().sum() > 0 for e in module.epsilon.values())


def test_one_optimizer_step_per_batch(tiny_formatter):
    model, dm, module = setup(tiny_formatter, n_user=12, lr=1e-3, optimizer=torch.optim.AdamW)
    trainer = fit(module, dm, steps=-1, max_epochs=1)
    assert trainer.global_step == 3  # 12 samples, batch 4


def test_epsilon_is_saved_and_restored_with_the_checkpoint(tiny_formatter, tmp_path):
    model, dm, module = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    trainer = fit(module, dm, steps=1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    _, _, fresh = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    checkpoint = torch.load(tmp_path / "step1.ckpt", weights_only=False)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.epsilon.keys() == module.epsilon.keys()
    assert all(torch.equal(fresh.epsilon[k], module.epsilon[k]) for k in module.epsilon)


def test_fp16_is_refused(tiny_formatter):
    from types import SimpleNamespace

    from plumbing.errors import InputError

    _, _, module = setup(tiny_formatter)
    module._trainer = SimpleNamespace(precision="16-mixed", world_size=1)
    with pytest.raises(InputError, match="refuses precision=16-mixed.*bf16-mixed"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(precision="bf16-mixed", world_size=1)
    module.on_fit_start()


def test_resumed_run_applies_the_same_epsilon(tiny_formatter, tmp_path):
    """Three steps in one go vs one step, a checkpoint, and two resumed steps: same weights, same
    ε. Each user batch is the whole user set; the defender's batches (2 of 5 pairs) differ from
    step to step and wrap around, so the resumed run must pick up the harmful batches where it was."""
    kwargs = dict(lr=1e-2, optimizer=torch.optim.AdamW, n_defender=5, harmful_batch_size=2)
    model_a, dm_a, module_a = setup(tiny_formatter, **kwargs)
    fit(module_a, dm_a, steps=3)

    model_b, dm_b, module_b = setup(tiny_formatter, **kwargs)
    trainer = fit(module_b, dm_b, steps=1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    model_c, dm_c, module_c = setup(tiny_formatter, **kwargs)
    resumed = fit(module_c, dm_c, steps=3, ckpt_path=tmp_path / "step1.ckpt")
    assert resumed.global_step == 3 and module_c.harmful.drawn == 3
    for name, eps in module_a.epsilon.items():
        torch.testing.assert_close(module_c.epsilon[name], eps, rtol=1e-4, atol=1e-6)
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6, msg=name)
