"""Antibody's tiny setups (alignment and weighted fine-tuning) and their steps computed
independently (torch.func), shared by the module's tests, its diagnostics' tests and the
two-process tests."""

from functools import partial

import torch
from torch.func import functional_call

from datamodules.formatting import collate
from datamodules.refusals import refusal_for
from datamodules.supervised import SupervisedDataModule
from helpers.training import alignment_data, tiny_lora
from lightning_modules.antibody import AntibodyAlignModule, WeightedSFTModule
from lightning_modules.causal_lm import answer_loss, answer_token_nll

ALPHA, LAMBDA2 = 0.5, 0.3


def align_setup(
    fmt,
    lr=1.0,
    eta=0.5,
    rule="cosine",
    momentum=0.9,
    n_safe=4,
    batch_size=4,
    n_defender=3,
    harmful_batch_size=3,
    optimizer=torch.optim.SGD,
):
    model = tiny_lora()
    dm = alignment_data(fmt, n_safe, batch_size, n_defender)
    module = AntibodyAlignModule(
        model,
        optimizer=partial(optimizer, lr=lr),
        alpha=ALPHA,
        eta=eta,
        ema_momentum=momentum,
        lambda2=LAMBDA2,
        lambda_rule=rule,
        harmful_batch_size=harmful_batch_size,
    )
    return model, dm, module


def loss_fn(model, params, batch):
    logits = functional_call(
        model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    ).logits
    return answer_loss(logits, batch["labels"])


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def independent_alignment_update(model, safe_batch, harmful_batch, refusal_batch, eta, rule):
    """A + λ·S + λ2·R on flat vectors with torch.func; θ' is a new dict, nothing in place."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }

    def grad(params, batch):
        return flat(torch.autograd.grad(loss_fn(model, params, batch), [params[n] for n in names]))

    Hh = grad(theta, harmful_batch)
    step = ALPHA * Hh / (Hh.norm() + 1e-7)
    offsets, start = {}, 0
    for n in names:
        offsets[n] = step[start : start + theta[n].numel()].view_as(theta[n])
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
        out[n] = update[start : start + theta[n].numel()].view_as(theta[n])
        start += theta[n].numel()
    return out, lam


def defender_batches(fmt, dm):
    pad = fmt.tokenizer.pad_token_id
    harmful = collate([fmt.encode(fmt.prompt(p.prompt), p.answer) for p in dm.defender_pairs], pad)
    refusal = collate(
        [fmt.encode(fmt.prompt(p.prompt), refusal_for(i)) for i, p in enumerate(dm.defender_pairs)],
        pad,
    )
    return harmful, refusal


# --- weighted fine-tuning -------------------------------------------------------------------------
def weighting_setup(fmt, flip_flags=False, lr=1.0):
    model = tiny_lora()
    samples = [
        {
            "prompt": fmt.prompt(f"Review {i}: fine."),
            "answer": "positive" + " indeed" * i,
            "is_harmful": (i % 2 == 1) != flip_flags,
        }
        for i in range(4)
    ]
    dm = SupervisedDataModule(samples, fmt, batch_size=4, seed=0)
    module = WeightedSFTModule(model, optimizer=partial(torch.optim.SGD, lr=lr), tau=0.7)
    return model, dm, module, samples


def independent_weighted_update(model, fmt, samples, tau=0.7):
    """∇ of Σ w_i Σ_t CE_it / Σ w_i N_i with w = softmax(r/τ) over all `samples`, by torch.func;
    returns (gradients by name, weights in the order of `samples`). A sample's refusal is
    refusal_for(its "index" key, else its position), as the datamodule pairs them."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    pad = fmt.tokenizer.pad_token_id
    answers = collate([fmt.encode(s["prompt"], s["answer"]) for s in samples], pad)
    refusals = collate(
        [fmt.encode(s["prompt"], refusal_for(s.get("index", i))) for i, s in enumerate(samples)],
        pad,
    )

    def per_sample(batch):
        logits = functional_call(
            model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
        ).logits
        return answer_token_nll(logits, batch["labels"])

    a_sum, a_count = per_sample(answers)
    r_sum, r_count = per_sample(refusals)
    r = (r_sum / r_count - a_sum / a_count).detach()
    w = torch.softmax(r / tau, dim=0)
    loss = (w * a_sum).sum() / (w * a_count).sum()
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]))), w
