"""Tiny setups of the alignment-stage baselines (Booster, Vaccine) and their steps computed
independently of the modules (torch.func, the test's own hooks), shared by the modules' tests and
the two-process tests."""

from functools import partial

import torch
from torch.func import functional_call

from helpers.training import alignment_data, tiny_lora
from lightning_modules.booster import BoosterModule
from lightning_modules.causal_lm import answer_loss
from lightning_modules.vaccine import VaccineModule

LAM, ALPHA = 0.7, 0.3


def booster_setup(
    fmt,
    lr=1.0,
    lam=LAM,
    alpha=ALPHA,
    n_defender=3,
    harmful_batch_size=3,
    batch_size=4,
    max_grad_norm=None,
):
    dm = alignment_data(fmt, 4, batch_size, n_defender, refusal_growth=1)
    module = BoosterModule(
        tiny_lora(),
        optimizer=partial(torch.optim.SGD, lr=lr),
        lam=lam,
        alpha=alpha,
        harmful_batch_size=harmful_batch_size,
        max_grad_norm=max_grad_norm,
    )
    return module, dm


def vaccine_setup(fmt, rho=0.5, lr=1.0, batch_size=4, hook_target="attention", max_grad_norm=None):
    dm = alignment_data(fmt, 4, batch_size, n_defender=0, refusal_growth=1)
    module = VaccineModule(
        tiny_lora(),
        optimizer=partial(torch.optim.SGD, lr=lr),
        rho=rho,
        hook_target=hook_target,
        max_grad_norm=max_grad_norm,
    )
    return module, dm


def _loss(model, params, batch):
    logits = functional_call(
        model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    ).logits
    return answer_loss(logits, batch["labels"])


def independent_booster_update(model, align_batch, harmful_batch, lam=LAM, alpha=ALPHA):
    """A + λ(H − H') with the moved weights as a new dict (nothing in place)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    H = torch.autograd.grad(_loss(model, w, harmful_batch), [w[n] for n in names])
    norm = torch.sqrt(sum((h**2).sum() for h in H))
    moved = {
        n: (w[n] - alpha * h / (norm + 1e-7)).detach().requires_grad_(True)
        for n, h in zip(names, H)
    }
    H2 = torch.autograd.grad(_loss(model, moved, harmful_batch), [moved[n] for n in names])
    A = torch.autograd.grad(_loss(model, w, align_batch), [w[n] for n in names])
    return {n: a + lam * (h - h2) for n, a, h, h2 in zip(names, A, H, H2)}


def attention_modules(model):
    """Each decoder layer's self_attn, found by the test by name (Llama layout)."""
    return [m for n, m in model.named_modules() if n.endswith("self_attn")]


def independent_vaccine_update(model, batch, rho, layers=None):
    """Pass 1: the attention outputs of `layers` (default all) captured by the test's own hooks
    and ∂f/∂a_l by autograd.grad; ε = ρ·G/‖G‖ over those layers; pass 2: hooks that return
    a_l + ε_l. Returns (grads, ε, f(w), f(w; ε))."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    hooked = attention_modules(model)
    if layers is not None:
        hooked = [hooked[i] for i in layers]
    outputs = []
    handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o[0])) for m in hooked]
    loss = answer_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    for h in handles:
        h.remove()
    G = torch.autograd.grad(loss, outputs)
    norm = torch.sqrt(sum((g**2).sum() for g in G))
    eps = [rho * g / (norm + 1e-7) for g in G]
    it = iter(eps)
    handles = [
        m.register_forward_hook(lambda m, a, o, e=e: (o[0] + e, *o[1:])) for m, e in zip(hooked, it)
    ]
    loss2 = answer_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss2, [params[n] for n in names])
    return dict(zip(names, grads)), eps, loss.detach(), loss2.detach()


def t_vaccine_setup(
    fmt, rho=0.5, lr=1.0, batch_size=4, n_defender=1, optimizer=torch.optim.SGD, **kwargs
):
    from lightning_modules.t_vaccine import TVaccineModule

    dm = alignment_data(fmt, 4, batch_size, n_defender, refusal_growth=1)
    module = TVaccineModule(tiny_lora(), optimizer=partial(optimizer, lr=lr), rho=rho, **kwargs)
    return module, dm
