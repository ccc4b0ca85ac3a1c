"""Booster's step (lightning_modules/booster.py) pinned against an independent computation on the
tiny model (tests/helpers/alignment_baselines.py)."""

import pytest
import torch

from datamodules.formatting import collate
from helpers.alignment_baselines import booster_setup, independent_booster_update
from helpers.training import clipped, fit_steps
from lightning_modules.booster import BoosterModule
from plumbing.errors import InputError


def batches(fmt, dm):
    align_batch = next(iter(dm.train_dataloader()))
    harmful_batch = collate(
        [fmt.encode(fmt.prompt(p.prompt), p.answer) for p in dm.defender_pairs],
        pad_id=fmt.tokenizer.pad_token_id,
    )
    return align_batch, harmful_batch


def update_of_one_step(module, dm):
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    fit_steps(module, dm, 1)
    return {n: before[n] - p.detach() for n, p in params.items()}  # SGD(lr=1): the gradient


@pytest.mark.parametrize("lam,alpha", [(0.7, 0.3), (0.0, 0.3), (0.7, 0.0)])
def test_step_equals_independent_gradient(tiny_formatter, lam, alpha):
    """λ = 0 and α = 0 (H' = H) both leave the alignment gradient A alone."""
    module, dm = booster_setup(tiny_formatter, lam=lam, alpha=alpha)
    align_batch, harmful_batch = batches(tiny_formatter, dm)
    expected = independent_booster_update(module.model, align_batch, harmful_batch, lam, alpha)
    sft = independent_booster_update(module.model, align_batch, harmful_batch, 0.0, alpha)
    update = update_of_one_step(module, dm)
    for n in expected:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)
        if lam == 0 or alpha == 0:
            torch.testing.assert_close(update[n], sft[n], rtol=1e-4, atol=1e-7)
    assert module.harmful.drawn == 1  # one harmful batch for both harmful passes


def test_clip_scales_the_composed_gradient(tiny_formatter):
    module, dm = booster_setup(tiny_formatter, max_grad_norm=0.05)
    align_batch, harmful_batch = batches(tiny_formatter, dm)
    expected = clipped(independent_booster_update(module.model, align_batch, harmful_batch), 0.05)
    update = update_of_one_step(module, dm)
    for n in expected:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)


def test_weights_restored_bit_exactly(tiny_formatter):
    module, dm = booster_setup(tiny_formatter, lr=0.0)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_steps(module, dm, 1)
    assert all(torch.equal(before[n], p.detach()) for n, p in module.model.named_parameters())


def test_difference_of_harmful_gradients_is_a_hessian_vector_product(tiny_formatter):
    """(H − H')/α → ∇²h·H/‖H‖ as α → 0: with λ = 1/α the step's extra gradient is that quotient,
    compared with a double-backward Hessian-vector product in float64."""
    alpha = 1e-4
    module, dm = booster_setup(tiny_formatter, lam=1 / alpha, alpha=alpha)
    module.model.double()
    align_batch, harmful_batch = batches(tiny_formatter, dm)
    sft = independent_booster_update(module.model, align_batch, harmful_batch, 0.0, alpha)
    update = update_of_one_step(module, dm)
    module.model.zero_grad()
    names = list(sft)
    params = dict(module.model.named_parameters())
    for n, p in params.items():  # undo the step
        if n in update:
            p.data += update[n]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_modules.causal_lm import answer_loss

    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused attention has no double backward
        h = answer_loss(
            module.model(
                input_ids=harmful_batch["input_ids"], attention_mask=harmful_batch["attention_mask"]
            ).logits,
            harmful_batch["labels"],
        )
    H = torch.autograd.grad(h, [params[n] for n in names], create_graph=True)
    norm = torch.sqrt(sum((g**2).sum() for g in H)).detach()
    dot = sum((g * (g.detach() / norm)).sum() for g in H)
    hvp = torch.autograd.grad(dot, [params[n] for n in names])
    quotient = torch.cat([(update[n] - sft[n]).flatten() for n in names])
    expected = torch.cat([v.flatten() for v in hvp])
    assert torch.linalg.norm(quotient - expected) / torch.linalg.norm(expected) < 1e-2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lam": -1.0}, "lam=-1.0 must be a number >= 0"),
        ({"alpha": -0.1}, "alpha=-0.1 must be a number >= 0"),
        ({"harmful_batch_size": 0}, "harmful_batch_size=0 must be an integer >= 1"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    assert BoosterModule.hyperparameter_problems(kwargs) == [message]
    with pytest.raises(InputError, match=message):
        BoosterModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)
