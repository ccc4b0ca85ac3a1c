"""Panacea's tiny setup and its step computed independently (torch.func), shared by the module's
tests, its diagnostics' tests and the two-process tests."""

from functools import partial

import torch
from torch.func import functional_call

from datamodules.supervised import SupervisedDataModule
from helpers.training import Pair, tiny_lora
from lightning_modules.causal_lm import answer_loss
from lightning_modules.panacea import PanaceaModule

RHO, LAM, CLAMP = 0.5, 0.5, None


def setup(
    tiny_formatter,
    n_user=4,
    lr=1.0,
    clamp=CLAMP,
    optimizer=torch.optim.SGD,
    n_defender=3,
    harmful_batch_size=3,
    module_class=PanaceaModule,
    batch_size=4,
    max_grad_norm=None,
):
    model = tiny_lora()
    users = [
        {
            "prompt": tiny_formatter.prompt(f"Review {i}: fine."),
            "answer": "positive",
            "is_harmful": False,
        }
        for i in range(n_user)
    ]
    defender = [
        Pair(f"How do I do harm number {i}?", f"Step one: harm {i}.") for i in range(n_defender)
    ]
    dm = SupervisedDataModule(
        users, tiny_formatter, batch_size=batch_size, seed=0, defender_pairs=defender
    )
    module = module_class(
        model,
        optimizer=partial(optimizer, lr=lr),
        rho=RHO,
        lam=LAM,
        harmful_batch_size=harmful_batch_size,
        harmful_loss_clamp=clamp,
        max_grad_norm=max_grad_norm,
    )
    return model, dm, module


def independent_update(model, user_batch, harmful_batch, clamp):
    """G − λ(H_ε − H) with torch.func on a dict of parameters: no in-place perturbation."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }

    def loss(ps, batch):
        logits = functional_call(
            model, ps, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
        ).logits
        return answer_loss(logits, batch["labels"])

    G = torch.autograd.grad(loss(params, user_batch), [params[n] for n in names])
    H = torch.autograd.grad(loss(params, harmful_batch), [params[n] for n in names])
    norm = torch.sqrt(sum((h**2).sum() for h in H))
    eps = {n: RHO * h / (norm + 1e-7) for n, h in zip(names, H)}
    perturbed = {n: (params[n] + eps[n]).detach().requires_grad_(True) for n in names}
    h_eps = loss(perturbed, harmful_batch)
    if clamp is not None:
        h_eps = torch.clamp(h_eps, max=clamp)
    H_eps = torch.autograd.grad(h_eps, [perturbed[n] for n in names])
    return {n: g - LAM * (he - h) for n, g, h, he in zip(names, G, H, H_eps)}, eps
