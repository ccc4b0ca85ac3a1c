"""Panacea's step pinned against an independent computation on the tiny model."""

from functools import partial

import lightning as L
import pytest
import torch
from torch.func import functional_call

from callbacks.diagnostics import epsilon_norms, layer_norms
from lightning_modules.post_transforms import AddGaussianNoise, AddPanaceaEpsilon
from datamodules.formatting import collate
from datamodules.supervised import SupervisedDataModule
from lightning_modules.causal_lm import answer_loss
from lightning_modules.gradients import global_norm
from lightning_modules.panacea import PanaceaModule
from conftest import Pair, tiny_lora
from conftest import fit_steps as fit

RHO, LAM, CLAMP = 0.5, 0.5, None


def setup(tiny_formatter, n_user=4, lr=1.0, clamp=CLAMP, optimizer=torch.optim.SGD, n_defender=3,
          harmful_batch_size=3, module_class=PanaceaModule, batch_size=4):
    model = tiny_lora()
    users = [{"prompt": tiny_formatter.prompt(f"Review {i}: fine."), "answer": "positive", "is_harmful": False}
             for i in range(n_user)]
    defender = [Pair(f"How do I do harm number {i}?", f"Step one: harm {i}.") for i in range(n_defender)]
    dm = SupervisedDataModule(users, tiny_formatter, batch_size=batch_size, seed=0, defender_pairs=defender)
    module = module_class(model, optimizer=partial(optimizer, lr=lr), rho=RHO, lam=LAM,
                          harmful_batch_size=harmful_batch_size, harmful_loss_clamp=clamp)
    return model, dm, module


def independent_update(model, user_batch, harmful_batch, clamp):
    """G − λ(H_ε − H) with torch.func on a dict of parameters: no in-place perturbation."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}

    def loss(ps, batch):
        logits = functional_call(model, ps, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}).logits
        return answer_loss(logits, batch["labels"])

    G = torch.autograd.grad(loss(params, user_batch), [params[n] for n in names])
    H = torch.autograd.grad(loss(params, harmful_batch), [params[n] for n in names])
    norm = torch.sqrt(sum((h ** 2).sum() for h in H))
    eps = {n: RHO * h / (norm + 1e-7) for n, h in zip(names, H)}
    perturbed = {n: (params[n] + eps[n]).detach().requires_grad_(True) for n in names}
    h_eps = loss(perturbed, harmful_batch)
    if clamp is not None:
        h_eps = torch.clamp(h_eps, max=clamp)
    H_eps = torch.autograd.grad(h_eps, [perturbed[n] for n in names])
    return {n: g - LAM * (he - h) for n, g, h, he in zip(names, G, H, H_eps)}, eps


@pytest.mark.parametrize("clamp", [None, 100.0, 0.1])
def test_step_equals_independent_gradient(tiny_formatter, clamp):
    model, dm, module = setup(tiny_formatter, clamp=clamp)
    user_batch = next(iter(dm.train_dataloader()))
    harmful_batch = collate(
        [{**tiny_formatter.encode(tiny_formatter.prompt(p.prompt), p.answer)} for p in dm.defender_pairs],
        pad_id=tiny_formatter.tokenizer.pad_token_id)
    expected_grad, expected_eps = independent_update(model, user_batch, harmful_batch, clamp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = fit(module, dm, steps=1)
    assert trainer.global_step == 1
    for n, p in model.named_parameters():
        if p.requires_grad:  # SGD with lr = 1: w_after = w_before - grad
            torch.testing.assert_close(before[n] - p.detach(), expected_grad[n], rtol=1e-4, atol=1e-6)
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


def test_deployed_weights_are_fine_tuned_plus_epsilon(tiny_formatter, tmp_path):
    model, dm, module = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    fit(module, dm, steps=2)
    w_T = {n: p.detach().clone() for n, p in model.named_parameters()}
    AddPanaceaEpsilon()(model, module)
    for n, p in model.named_parameters():
        expected = w_T[n] + module.epsilon[n] if n in module.epsilon else w_T[n]
        assert torch.equal(p.detach(), expected)
    rows = layer_norms(module.epsilon)
    assert {(r["layer"], r["module"]) for r in rows} == {(i, m) for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert sum(r["norm"] ** 2 for r in rows) == pytest.approx(RHO ** 2, rel=1e-4)
    assert epsilon_norms(module, tmp_path, logger=None)["epsilon_norm"] == pytest.approx(RHO, rel=1e-4)
    assert (tmp_path / "epsilon_layer_norms.png").stat().st_size > 0
    assert (tmp_path / "epsilon_layer_norms.csv").read_text().startswith("layer,module,norm")


def test_epsilon_is_saved_and_restored_with_the_checkpoint(tiny_formatter, tmp_path):
    model, dm, module = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    trainer = fit(module, dm, steps=1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    _, _, fresh = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    checkpoint = torch.load(tmp_path / "step1.ckpt", weights_only=False)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.epsilon.keys() == module.epsilon.keys()
    assert all(torch.equal(fresh.epsilon[k], module.epsilon[k]) for k in module.epsilon)


def test_random_perturbation_has_the_given_intensity(tiny_formatter, tmp_path):
    model, _, _ = setup(tiny_formatter)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    AddGaussianNoise(intensity=0.05, seed=0)(model)
    deltas = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if p.requires_grad])
    frozen_same = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen_same and deltas.std().item() == pytest.approx(0.05, rel=0.1)


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
    resumed = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    resumed.fit(module_c, datamodule=dm_c, ckpt_path=tmp_path / "step1.ckpt")
    assert resumed.global_step == 3 and module_c.harmful.drawn == 3
    for name, eps in module_a.epsilon.items():
        torch.testing.assert_close(module_c.epsilon[name], eps, rtol=1e-4, atol=1e-6)
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6, msg=name)
