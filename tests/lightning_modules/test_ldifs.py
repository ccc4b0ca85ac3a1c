"""LDIFS's step (lightning_modules/ldifs.py) against an independent computation on the tiny model."""

import pytest
import torch

from helpers.ldifs import SHIFT, independent_ldifs_grad, ldifs_setup
from helpers.training import fit_steps
from lightning_modules.ldifs import LDIFSModule
from plumbing.errors import InputError


def one_step(module, dm):
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    fit_steps(module, dm, 1)
    return {n: before[n] - p.detach() for n, p in params.items()}, before


@pytest.mark.parametrize("rho,drop_above", [(0.5, None), (0.0, None), (0.5, 1e-9)])
def test_step_equals_independent_gradient(tiny_formatter, rho, drop_above):
    """ρ = 0, or every layer over the threshold, leave the SFT gradient."""
    module, dm = ldifs_setup(tiny_formatter, rho=rho, drop_above=drop_above)
    batch = next(iter(dm.train_dataloader()))
    expected = independent_ldifs_grad(module.model, batch, rho, drop_above)
    sft = independent_ldifs_grad(module.model, batch, 0.0)
    update, _ = one_step(module, dm)
    for n in expected:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)
    differs = any(not torch.allclose(update[n], sft[n], atol=1e-6) for n in sft)
    assert differs == (rho > 0 and drop_above is None)


def test_reference_forward_leaves_the_start_and_the_weights_alone(tiny_formatter):
    module, dm = ldifs_setup(tiny_formatter, lr=0.0)
    _, before = one_step(module, dm)
    for n, p in module.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), before[n])  # restored bit-exactly after the swap
            assert torch.equal(module.start[n], before[n] + SHIFT)
            assert not module.start[n].requires_grad


def test_first_step_of_a_real_run_is_sft(tiny_formatter):
    """Without the test's shift the start is the current adapter: no distance at step one."""
    module, dm = ldifs_setup(tiny_formatter, shifted=False)
    batch = next(iter(dm.train_dataloader()))
    sft = independent_ldifs_grad(module.model, batch, 0.0, shift=0.0)
    update, _ = one_step(module, dm)
    for n in sft:
        torch.testing.assert_close(update[n], sft[n], rtol=1e-4, atol=1e-7)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(InputError, match="rho=-1.0 must be a number >= 0"):
        LDIFSModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, rho=-1.0)


def test_a_resumed_start_is_placed_like_the_parameters(tiny_formatter):
    """The start a checkpoint restored on the CPU meets the parameters on their device, in their
    dtype (float64 stands in for a GPU on this CPU-only test)."""
    module, dm = ldifs_setup(tiny_formatter, shifted=False)
    one_step(module, dm)
    saved = {n: s.double() for n, s in module.start.items()}
    module.start = saved
    module.on_train_start()
    for n, p in module.model.named_parameters():
        if p.requires_grad:
            assert (module.start[n].device, module.start[n].dtype) == (p.device, p.dtype)
            torch.testing.assert_close(module.start[n], saved[n].float())


@pytest.mark.parametrize("drop_above", [None, 1e-9])
def test_the_logged_regularizer_is_the_kept_layers_sum(tiny_formatter, drop_above):
    """feature_distance sums every layer's term; regularizer only the terms under the cut-off."""
    module, dm = ldifs_setup(tiny_formatter, drop_above=drop_above)
    one_step(module, dm)
    logged = module.trainer.callback_metrics
    assert logged["train/feature_distance"] > 0
    if drop_above is None:
        torch.testing.assert_close(logged["train/regularizer"], logged["train/feature_distance"])
    else:
        assert logged["train/regularizer"] == 0 and logged["train/layers_kept"] == 0
