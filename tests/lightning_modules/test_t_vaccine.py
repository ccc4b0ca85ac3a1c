"""T-Vaccine's step (lightning_modules/t_vaccine.py) on the tiny model (2 decoder layers): the
layer probabilities, the schedule of probes and draws, and the step against an independent
Vaccine computation restricted to the chosen layers."""

import pytest
import torch

from datamodules.formatting import collate
from helpers.alignment_baselines import (
    attention_modules,
    independent_vaccine_update,
    t_vaccine_setup,
)
from helpers.training import fit_steps
from lightning_modules.causal_lm import answer_loss
from lightning_modules.t_vaccine import TVaccineModule
from plumbing.errors import InputError


def update_of_one_step(module, dm):
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    fit_steps(module, dm, 1)
    return {n: before[n] - p.detach() for n, p in params.items()}


def test_all_layers_active_is_vaccine(tiny_formatter):
    module, dm = t_vaccine_setup(tiny_formatter, active_layers=2)
    batch = next(iter(dm.train_dataloader()))
    expected, _, _, _ = independent_vaccine_update(module.model, batch, 0.5)
    update = update_of_one_step(module, dm)
    assert module.active == [0, 1]
    for n in expected:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)


def test_one_active_layer_perturbs_and_trains_only_that_layer(tiny_formatter):
    module, dm = t_vaccine_setup(tiny_formatter, active_layers=1)
    batch = next(iter(dm.train_dataloader()))
    model = module.model
    per_layer = {i: independent_vaccine_update(model, batch, 0.5, layers=[i]) for i in (0, 1)}
    update = update_of_one_step(module, dm)
    (chosen,) = module.active
    expected, eps, _, _ = per_layer[chosen]
    for n in expected:
        in_chosen = f"layers.{chosen}." in n
        if in_chosen:
            torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)
        else:
            assert torch.all(update[n] == 0), n  # the resting layer's tensors are not stepped
    assert torch.sqrt(sum((e**2).sum() for e in eps)).item() == pytest.approx(0.5, rel=1e-5)


def test_resting_tensors_get_no_weight_decay_either(tiny_formatter):
    module, dm = t_vaccine_setup(
        tiny_formatter, active_layers=1, optimizer=torch.optim.AdamW, lr=1e-2
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_steps(module, dm, 1)
    (chosen,) = module.active
    for n, p in module.model.named_parameters():
        if p.requires_grad and f"layers.{chosen}." not in n:
            assert torch.equal(before[n], p.detach()), n


def test_probabilities_are_the_normalised_attention_gradient_norms(tiny_formatter):
    module, dm = t_vaccine_setup(tiny_formatter, active_layers=1, n_defender=1)
    fmt, model = dm.formatter, module.model
    pair = dm.defender_pairs[0]
    harmful = collate(
        [fmt.encode(fmt.prompt(pair.prompt), pair.answer)], fmt.tokenizer.pad_token_id
    )
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, o: outputs.append(o[0]))
        for m in attention_modules(model)
    ]
    loss = answer_loss(
        model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"]).logits,
        harmful["labels"],
    )
    for h in handles:
        h.remove()
    norms = torch.stack([g.norm() for g in torch.autograd.grad(loss, outputs)])
    fit_steps(module, dm, 1)
    torch.testing.assert_close(
        module.probabilities, (norms / norms.sum()).detach(), rtol=1e-4, atol=1e-7
    )


def test_probes_and_draws_follow_their_schedules(tiny_formatter):
    module, dm = t_vaccine_setup(
        tiny_formatter, active_layers=1, switch_every=2, probe_every=3, batch_size=1, lr=1e-3
    )
    fit_steps(module, dm, 4)
    probes = [h["step"] for h in module.history if "probabilities" in h]
    draws = [h["step"] for h in module.history if "active" in h]
    assert probes == [0, 3] and draws == [0, 2]
    assert module.harmful.drawn == 2  # one harmful batch per probe
    again, dm2 = t_vaccine_setup(
        tiny_formatter, active_layers=1, switch_every=2, probe_every=3, batch_size=1, lr=1e-3
    )
    fit_steps(again, dm2, 4)
    assert again.history == module.history  # seeded draws


def test_more_active_layers_than_the_model_has_is_refused(tiny_formatter):
    module, dm = t_vaccine_setup(tiny_formatter, active_layers=3)
    with pytest.raises(InputError, match="active_layers=3 exceeds this model's 2 decoder layers"):
        fit_steps(module, dm, 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rho": -1.0}, "rho=-1.0 must be a number >= 0"),
        ({"active_layers": 0}, "active_layers=0 must be an integer >= 1"),
        ({"probe_every": 0}, "probe_every=0 must be an integer >= 1"),
        ({"hook_target": "nope"}, "hook_target='nope' must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    assert TVaccineModule.hyperparameter_problems(kwargs)[0].startswith(message.split(" must")[0])
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        TVaccineModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)
