"""Antibody's two stages pinned against independent computations on the tiny model (the setups
and the independent computations are in tests/helpers/antibody.py)."""

import pytest
import torch

from helpers.antibody import (
    align_setup,
    defender_batches,
    independent_alignment_update,
    independent_weighted_update,
    weighting_setup,
)
from helpers.training import fit_steps as fit
from helpers.training import tiny_lora
from lightning_modules.antibody import WeightedSFTModule, sample_weights, weighted_answer_loss


@pytest.mark.parametrize("rule,eta", [("cosine", 0.5), ("theorem", 0.5), ("cosine", -5.0)])
def test_alignment_step_equals_independent_gradient(tiny_formatter, rule, eta):
    """One step, SGD lr=1: θ_before − θ_after = A + λ·S + λ2·R (η = −5 checks the clamp at 0)."""
    model, dm, module = align_setup(tiny_formatter, eta=eta, rule=rule)
    safe_batch = next(iter(dm.train_dataloader()))  # the whole safe set: order does not matter
    harmful, refusal = defender_batches(tiny_formatter, dm)
    expected, lam = independent_alignment_update(model, safe_batch, harmful, refusal, eta, rule)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = fit(module, dm, steps=1)
    assert trainer.global_step == 1
    assert module.history[0]["lambda_raw"] == pytest.approx(lam, rel=1e-4, abs=1e-8)
    assert (lam == 0.0) == (eta < 0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(before[n], p.detach())


def test_simulated_attack_is_restored_exactly(tiny_formatter):
    model, dm, module = align_setup(tiny_formatter, lr=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(module, dm, steps=2)
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert module.history[0]["harmful_loss_after_attack"] < module.history[0]["harmful_loss"]


def test_lambda_follows_the_ema(tiny_formatter):
    model, dm, module = align_setup(
        tiny_formatter,
        lr=1e-2,
        momentum=0.7,
        n_safe=8,
        batch_size=2,
        n_defender=5,
        harmful_batch_size=2,
        optimizer=torch.optim.AdamW,
    )
    trainer = fit(module, dm, steps=-1, max_epochs=1)
    assert trainer.global_step == 4 and len(module.history) == 4
    raw = [h["lambda_raw"] for h in module.history]
    assert len(set(raw)) == 4  # different batches, different λ_raw
    expected = raw[0]
    for h, r in zip(module.history, raw):
        expected = r if h is module.history[0] else 0.7 * expected + 0.3 * r
        assert h["lambda_t"] == pytest.approx(expected, rel=1e-6)
    assert module.lambda_t.item() == pytest.approx(expected, rel=1e-6)


def test_bad_antibody_settings_are_refused(tiny_formatter):
    from plumbing.errors import InputError

    with pytest.raises(InputError, match="lambda_rule='sam'"):
        align_setup(tiny_formatter, rule="sam")
    with pytest.raises(InputError, match="tau=0"):
        WeightedSFTModule(tiny_lora(), optimizer=torch.optim.SGD, tau=0)


# --- weighted fine-tuning -------------------------------------------------------------------------
def test_weighted_loss_on_a_hand_made_batch():
    nll_sum = torch.tensor([2.0, 6.0, 3.0])
    count = torch.tensor([1, 3, 2])
    weights = torch.tensor([0.5, 0.3, 0.2])
    # (0.5*2 + 0.3*6 + 0.2*3) / (0.5*1 + 0.3*3 + 0.2*2) = 3.4 / 1.8
    assert weighted_answer_loss(nll_sum, count, weights).item() == pytest.approx(3.4 / 1.8)
    uniform = torch.full((3,), 1 / 3)
    assert weighted_answer_loss(nll_sum, count, uniform).item() == pytest.approx(
        11 / 6
    )  # plain token mean


def test_weights_are_a_detached_softmax_summing_to_one():
    scores = torch.tensor([0.5, -2.0, 3.0, 0.0], requires_grad=True)
    for tau in (0.5, 1.0, 4.0):
        w = sample_weights(scores, tau)
        assert w.sum().item() == pytest.approx(1.0) and not w.requires_grad
        e = [torch.exp(torch.tensor(s / tau)) for s in (0.5, -2.0, 3.0, 0.0)]
        assert w.tolist() == pytest.approx([x.item() / sum(e).item() for x in e])


def test_weighted_step_equals_independent_gradient_and_ignores_harm_labels(tiny_formatter):
    fmt = tiny_formatter
    model, dm, module, samples = weighting_setup(fmt)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected, w = independent_weighted_update(model, fmt, samples)

    results = []
    for flip in (False, True):
        model, dm, module, _ = weighting_setup(fmt, flip_flags=flip)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(module, dm, steps=1)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        for n in names:
            torch.testing.assert_close(
                before[n] - results[-1][n], expected[n], rtol=1e-4, atol=1e-6
            )
        recorded = sorted(module.step_records, key=lambda rec: rec["index"])
        assert [rec["weight"] for rec in recorded] == pytest.approx(w.tolist(), rel=1e-4)
        assert sum(rec["weight"] for rec in recorded) == pytest.approx(1.0)
    assert all(
        torch.equal(results[0][n], results[1][n]) for n in names
    )  # labels are for logging only


def test_resumed_alignment_continues_lambda_and_harmful_batches(tiny_formatter, tmp_path):
    kwargs = dict(lr=1e-2, optimizer=torch.optim.AdamW, n_defender=5, harmful_batch_size=2)
    model_a, dm_a, module_a = align_setup(tiny_formatter, **kwargs)
    fit(module_a, dm_a, steps=3)
    model_b, dm_b, module_b = align_setup(tiny_formatter, **kwargs)
    fit(module_b, dm_b, steps=1).save_checkpoint(tmp_path / "step1.ckpt")
    model_c, dm_c, module_c = align_setup(tiny_formatter, **kwargs)
    fit(module_c, dm_c, steps=3, ckpt_path=tmp_path / "step1.ckpt")
    assert [h["lambda_t"] for h in module_c.history] == pytest.approx(
        [h["lambda_t"] for h in module_a.history], rel=1e-5
    )
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6, msg=name)
