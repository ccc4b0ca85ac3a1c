"""Lisa's fine-tuning (lightning_modules/lisa.py) on the tiny model: its schedule step by step,
the discarded user batches, the anchors, the proximal gradient, and SFT as its special case."""

from functools import partial

import lightning as L
import pytest
import torch

from helpers.lisa import datamodule, lisa
from helpers.training import fit_steps, tiny_lora
from lightning_modules.causal_lm import CausalLMModule, answer_loss
from lightning_modules.lisa import LisaModule
from plumbing.errors import InputError


class Recorder(L.Callback):
    """Per step: the user batch the loader yielded, and the weights after the step."""

    def __init__(self):
        self.user, self.weights = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.user.append(batch["index"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(
            {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
        )


def test_schedule_is_the_references(tiny_formatter):
    """K1 = 2, K2 = 3: AAFFFAAFFFAA; alignment steps draw alignment batches, user steps train on
    the user batch the loader yielded, and the user batches of alignment steps are discarded."""
    module, dm = lisa(), datamodule(tiny_formatter, n=24)
    fit_steps(module, dm, 12)
    assert "".join(m[0].upper() for m in module.modes) == "AAFFFAAFFFAA"
    assert module.alignment.drawn == module.modes.count("alignment") == 6


def test_resumed_anchors_are_placed_like_the_parameters(tiny_formatter):
    """A checkpoint holds the anchors on the CPU and Lightning restores them before the model moves
    to its device; the fit's start places them like the parameters. float64 stands in for "not
    where the parameters are" (a GPU on this CPU-only test)."""
    module, dm = lisa(), datamodule(tiny_formatter)
    fit_steps(module, dm, 2)
    saved = {k: {n: a.double() for n, a in anchor.items()} for k, anchor in module.anchors.items()}
    module.anchors = saved
    module.on_train_start()
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    for k, anchor in module.anchors.items():
        for n, a in anchor.items():
            assert (a.device, a.dtype) == (params[n].device, params[n].dtype)
            torch.testing.assert_close(a, saved[k][n].float())


def test_user_steps_train_on_the_user_batch_and_alignment_steps_on_alignment_data(tiny_formatter):
    module, dm = lisa(lr=1.0), datamodule(tiny_formatter)
    recorder = Recorder()
    align_batches = []

    def record(trainer, mod, *args):
        if getattr(mod.alignment, "recorded", False):
            return
        original = mod.alignment.next

        def next_(device):
            b = original(device)
            align_batches.append(b)
            return b

        mod.alignment.next, mod.alignment.recorded = next_, True

    hook = type("H", (L.Callback,), {"on_train_batch_start": lambda self, t, m, *a: record(t, m)})()
    fit_steps(module, dm, 3, callbacks=[recorder, hook])
    assert module.modes == ["alignment", "alignment", "finetune"]
    # step 3 (finetune) trained on the user batch the loader yielded at that step (SGD lr = 1)
    user_batch = dm.collate_batch([dm.encoded()[i] for i in recorder.user[2]])
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(recorder.weights[1][n])
    loss = answer_loss(
        module.model(
            input_ids=user_batch["input_ids"], attention_mask=user_batch["attention_mask"]
        ).logits,
        user_batch["labels"],
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for n in params:  # ρ = 0: no proximal term
        torch.testing.assert_close(
            recorder.weights[1][n] - recorder.weights[2][n], grads[n], rtol=1e-4, atol=1e-7
        )
    assert len(align_batches) == 2


def test_anchors_are_the_weights_at_the_switches(tiny_formatter):
    module, dm = lisa(k1=2, k2=3), datamodule(tiny_formatter, n=24)
    recorder = Recorder()
    fit_steps(module, dm, 7, callbacks=[recorder])
    # switch to finetune at step 2: W_align = weights after step 1; to alignment at step 5: W_ft
    # = weights after step 4
    for n, w in module.anchors["alignment"].items():
        assert torch.equal(w, recorder.weights[1][n])
    for n, w in module.anchors["finetune"].items():
        assert torch.equal(w, recorder.weights[4][n])


def test_proximal_gradient_pulls_towards_the_other_states_anchor(tiny_formatter):
    """Step 3 is a user step after the switch at step 2: its update is ∇CE + ρ(w − W_align), the
    proximal term on since step > 0.1·T."""
    rho = 0.7
    module, dm = lisa(rho=rho, lr=1.0, k1=2, k2=9), datamodule(tiny_formatter, n=24)
    recorder = Recorder()
    fit_steps(module, dm, 4, callbacks=[recorder])
    assert module.modes == ["alignment", "alignment", "finetune", "finetune"]
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(recorder.weights[2][n])
    batch = dm.collate_batch([dm.encoded()[i] for i in recorder.user[3]])
    loss = answer_loss(
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for n in params:
        expected = grads[n] + rho * (recorder.weights[2][n] - module.anchors["alignment"][n])
        torch.testing.assert_close(
            recorder.weights[2][n] - recorder.weights[3][n], expected, rtol=1e-4, atol=1e-7
        )


def test_no_proximal_term_in_the_first_tenth_of_the_steps(tiny_formatter):
    """warmup 1.0: never on, so ρ changes nothing."""
    runs = []
    for rho in (0.0, 5.0):
        module, dm = lisa(rho=rho, lr=1e-2, warmup=1.0), datamodule(tiny_formatter, n=24)
        fit_steps(module, dm, 6)
        runs.append({n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_no_alignment_steps_and_rho_zero_is_sft(tiny_formatter):
    weights = []
    for module in (
        lisa(rho=0.0, k1=0, k2=900, optimizer=torch.optim.AdamW),
        CausalLMModule(tiny_lora(), optimizer=partial(torch.optim.AdamW, lr=1e-2)),
    ):
        fit_steps(module, datamodule(tiny_formatter), 4)
        weights.append(
            {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
        )
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rho": -1.0}, "rho=-1.0 must be a number >= 0"),
        ({"align_steps": -1}, "align_steps=-1 must be an integer >= 0"),
        ({"finetune_steps": 4.5}, "finetune_steps=4.5 must be an integer >= 0"),
        ({"proximal_warmup": 2.0}, r"proximal_warmup=2.0 must be a number in \[0, 1\]"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        LisaModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)


def test_a_first_cycle_longer_than_the_fine_tuning_is_warned_about(tiny_formatter, caplog):
    """K1 >= the stage's steps: every step aligns and the user's data is never trained on."""
    module, dm = lisa(k1=12, k2=3), datamodule(tiny_formatter, n=24)
    with caplog.at_level("WARNING", logger="lightning_modules.lisa"):
        fit_steps(module, dm, 12)
    assert set(module.modes) == {"alignment"}
    assert "align_steps=12 (K1) >= the 12 steps of this fine-tuning" in caplog.text
