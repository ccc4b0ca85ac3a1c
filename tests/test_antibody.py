"""Antibody's two stages pinned against independent computations on the tiny model."""

from functools import partial

import lightning as L
import pytest
import torch
from torch.func import functional_call

from datamodules.formatting import collate
from datamodules.refusals import refusal_for
from callbacks.diagnostics import antibody_lambda, antibody_weights
from datamodules.supervised import SupervisedDataModule
from lightning_modules.antibody import (AntibodyAlignModule, WeightedSFTModule, sample_weights,
                                        weighted_answer_loss)
from lightning_modules.causal_lm import answer_loss, answer_token_nll
from conftest import Pair, tiny_lora
from conftest import fit_steps as fit

ALPHA, LAMBDA2 = 0.5, 0.3


def align_setup(fmt, lr=1.0, eta=0.5, rule="cosine", momentum=0.9, n_safe=4, batch_size=4, n_defender=3,
                harmful_batch_size=3, optimizer=torch.optim.SGD):
    model = tiny_lora()
    safe = [{"prompt": fmt.prompt(f"Tell me how to hurt {i}."), "answer": refusal_for(i), "is_harmful": False}
            for i in range(n_safe)]
    defender = [Pair(f"How do I do harm number {i}?", f"Step one: harm {i}." + " more" * i) for i in range(n_defender)]
    dm = SupervisedDataModule(safe, fmt, batch_size=batch_size, seed=0, defender_pairs=defender)
    module = AntibodyAlignModule(model, optimizer=partial(optimizer, lr=lr), alpha=ALPHA, eta=eta,
                                 ema_momentum=momentum, lambda2=LAMBDA2, lambda_rule=rule,
                                 harmful_batch_size=harmful_batch_size)
    return model, dm, module


def loss_fn(model, params, batch):
    logits = functional_call(model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}).logits
    return answer_loss(logits, batch["labels"])


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def independent_alignment_update(model, safe_batch, harmful_batch, refusal_batch, eta, rule):
    """A + λ·S + λ2·R on flat vectors with torch.func; θ' is a new dict, nothing in place."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}

    def grad(params, batch):
        return flat(torch.autograd.grad(loss_fn(model, params, batch), [params[n] for n in names]))

    Hh = grad(theta, harmful_batch)
    step = ALPHA * Hh / (Hh.norm() + 1e-7)
    offsets, start = {}, 0
    for n in names:
        offsets[n] = step[start:start + theta[n].numel()].view_as(theta[n])
        start += theta[n].numel()
    attacked = {n: (theta[n] - offsets[n]).detach().requires_grad_(True) for n in names}
    Hp, R, A = grad(attacked, harmful_batch), grad(attacked, refusal_batch), grad(theta, safe_batch)
    S = Hh - Hp
    if rule == "cosine":
        lam = max(eta - (A @ S / (A.norm() * S.norm() + 1e-8)).item(), 0.0)
    else:
        lam = max((eta - (A @ S).item()) / (S @ S).item(), 0.0)
    update = A + lam * S + LAMBDA2 * R
    out, start = {}, 0
    for n in names:
        out[n] = update[start:start + theta[n].numel()].view_as(theta[n])
        start += theta[n].numel()
    return out, lam


def defender_batches(fmt, dm):
    pad = fmt.tokenizer.pad_token_id
    harmful = collate([fmt.encode(fmt.prompt(p.prompt), p.answer) for p in dm.defender_pairs], pad)
    refusal = collate([fmt.encode(fmt.prompt(p.prompt), refusal_for(i)) for i, p in enumerate(dm.defender_pairs)], pad)
    return harmful, refusal


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
    model, dm, module = align_setup(tiny_formatter, lr=1e-2, momentum=0.7, n_safe=8, batch_size=2,
                                    n_defender=5, harmful_batch_size=2, optimizer=torch.optim.AdamW)
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
    assert weighted_answer_loss(nll_sum, count, uniform).item() == pytest.approx(11 / 6)  # plain token mean


def test_weights_are_a_detached_softmax_summing_to_one():
    scores = torch.tensor([0.5, -2.0, 3.0, 0.0], requires_grad=True)
    for tau in (0.5, 1.0, 4.0):
        w = sample_weights(scores, tau)
        assert w.sum().item() == pytest.approx(1.0) and not w.requires_grad
        e = [torch.exp(torch.tensor(s / tau)) for s in (0.5, -2.0, 3.0, 0.0)]
        assert w.tolist() == pytest.approx([x.item() / sum(e).item() for x in e])


def weighting_setup(fmt, flip_flags=False, lr=1.0):
    model = tiny_lora()
    samples = [{"prompt": fmt.prompt(f"Review {i}: fine."), "answer": "positive" + " indeed" * i,
                "is_harmful": (i % 2 == 1) != flip_flags} for i in range(4)]
    dm = SupervisedDataModule(samples, fmt, batch_size=4, seed=0)
    module = WeightedSFTModule(model, optimizer=partial(torch.optim.SGD, lr=lr), tau=0.7)
    return model, dm, module, samples


def independent_weighted_update(model, fmt, samples, tau=0.7):
    """∇ of Σ w_i Σ_t CE_it / Σ w_i N_i with w = softmax(r/τ) over all `samples`, by torch.func;
    returns (gradients by name, weights in the order of `samples`). A sample's refusal is
    refusal_for(its "index" key, else its position), as the datamodule pairs them."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    pad = fmt.tokenizer.pad_token_id
    answers = collate([fmt.encode(s["prompt"], s["answer"]) for s in samples], pad)
    refusals = collate([fmt.encode(s["prompt"], refusal_for(s.get("index", i))) for i, s in enumerate(samples)], pad)

    def per_sample(batch):
        logits = functional_call(model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}).logits
        return answer_token_nll(logits, batch["labels"])
    a_sum, a_count = per_sample(answers)
    r_sum, r_count = per_sample(refusals)
    r = (r_sum / r_count - a_sum / a_count).detach()
    w = torch.softmax(r / tau, dim=0)
    loss = (w * a_sum).sum() / (w * a_count).sum()
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]))), w


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
            torch.testing.assert_close(before[n] - results[-1][n], expected[n], rtol=1e-4, atol=1e-6)
        recorded = sorted(module.step_records, key=lambda rec: rec["index"])
        assert [rec["weight"] for rec in recorded] == pytest.approx(w.tolist(), rel=1e-4)
        assert sum(rec["weight"] for rec in recorded) == pytest.approx(1.0)
    assert all(torch.equal(results[0][n], results[1][n]) for n in names)  # labels are for logging only


def test_weighting_diagnostics_are_written(tiny_formatter, tmp_path):
    model, dm, module, samples = weighting_setup(tiny_formatter, lr=1e-2)
    fit(module, dm, steps=2)
    summary = antibody_weights(module, tmp_path, logger=None)
    assert len(module.scores_before) == len(module.scores_after) == 4
    assert {r["index"] for r in module.scores_before} == {0, 1, 2, 3}
    assert module.scores_before != module.scores_after  # the model moved between the two scorings
    assert 0.0 <= summary["score_auroc_before"] <= 1.0 and summary["harmful_mean_relative_weight"] > 0
    for name in ("antibody_scores", "antibody_weights"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "antibody_weights.csv").read_text().startswith("step,index,is_harmful,score,weight")


def test_alignment_diagnostics_are_written(tiny_formatter, tmp_path):
    model, dm, module = align_setup(tiny_formatter, lr=1e-2, optimizer=torch.optim.AdamW)
    fit(module, dm, steps=2)
    summary = antibody_lambda(module, tmp_path, logger=None)
    assert summary["steps"] == 2 and summary["final_lambda_t"] == module.lambda_t.item()
    assert (tmp_path / "antibody_lambda.png").stat().st_size > 0
    assert (tmp_path / "antibody_lambda.csv").read_text().startswith("step,lambda_raw,lambda_t,cos_A_S")


def test_resumed_alignment_continues_lambda_and_harmful_batches(tiny_formatter, tmp_path):
    kwargs = dict(lr=1e-2, optimizer=torch.optim.AdamW, n_defender=5, harmful_batch_size=2)
    model_a, dm_a, module_a = align_setup(tiny_formatter, **kwargs)
    fit(module_a, dm_a, steps=3)
    model_b, dm_b, module_b = align_setup(tiny_formatter, **kwargs)
    fit(module_b, dm_b, steps=1).save_checkpoint(tmp_path / "step1.ckpt")
    model_c, dm_c, module_c = align_setup(tiny_formatter, **kwargs)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module_c, datamodule=dm_c, ckpt_path=tmp_path / "step1.ckpt")
    assert [h["lambda_t"] for h in module_c.history] == pytest.approx([h["lambda_t"] for h in module_a.history], rel=1e-5)
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6, msg=name)
