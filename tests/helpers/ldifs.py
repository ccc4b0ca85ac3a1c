"""LDIFS's tiny setup and its step computed independently (the test's own hooks, a dict of start
tensors through torch.func), shared by its tests and the two-process tests."""

from functools import partial

import torch
from torch.func import functional_call

from datamodules.supervised import SupervisedDataModule
from helpers.training import tiny_lora
from lightning_modules.causal_lm import answer_loss
from lightning_modules.ldifs import LDIFSModule

SHIFT = 0.05  # the start tensors differ from the current ones by this much in the tests


class ShiftedStartLDIFS(LDIFSModule):
    """LDIFS whose starting adapter is the current one shifted by SHIFT: makes the first step's
    regularizer nonzero (in a real run the distance grows from zero over the steps)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.start = {n: t + SHIFT for n, t in self.start.items()}


def samples(fmt, n=4):
    return [
        {
            "prompt": fmt.prompt(f"Review {i}: fine."),
            "answer": "positive" + " really" * i,
            "is_harmful": False,
        }
        for i in range(n)
    ]


def ldifs_setup(fmt, rho=0.5, drop_above=None, lr=1.0, batch_size=4, shifted=True):
    cls = ShiftedStartLDIFS if shifted else LDIFSModule
    module = cls(
        tiny_lora(), optimizer=partial(torch.optim.SGD, lr=lr), rho=rho, drop_above=drop_above
    )
    return module, SupervisedDataModule(samples(fmt), fmt, batch_size=batch_size, seed=0)


def independent_ldifs_grad(model, batch, rho, drop_above=None, shift=SHIFT):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    w0 = {n: (p.detach() + shift) for n, p in model.named_parameters() if p.requires_grad}
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]

    def run(params):
        outs = []
        handles = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in mlps]
        logits = functional_call(
            model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
        ).logits
        for h in handles:
            h.remove()
        return outs, answer_loss(logits, batch["labels"])

    with torch.no_grad():
        ref, _ = run(w0)
    outs, loss = run(w)
    total = loss
    real = batch["attention_mask"].unsqueeze(-1).float()
    for m, r in zip(outs, ref):
        term = rho / 2 * (((m - r) * real) ** 2).sum()
        if drop_above is None or term.item() < drop_above:
            total = total + term
    grads = torch.autograd.grad(total, [w[n] for n in names])
    return dict(zip(names, grads))
