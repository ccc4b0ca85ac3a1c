"""Vaccine's step (lightning_modules/vaccine.py) pinned against an independent computation on the
tiny model (the test's own hooks and autograd.grad, tests/helpers/alignment_baselines.py)."""

import pytest
import torch

from helpers.alignment_baselines import (
    attention_modules,
    independent_vaccine_update,
    vaccine_setup,
)
from helpers.training import fit_steps
from lightning_modules.hooks import HOOK_TARGETS, hooked_modules, perturbed_outputs
from lightning_modules.vaccine import VaccineModule
from plumbing.errors import InputError


def one_step(module, dm):
    """(SGD(lr=1) update = the step's gradient, the ε the step built, the hidden gradients)."""
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    seen = {}
    build = module.perturbation

    def recorded(hidden_grads):
        seen["grads"] = [g.clone() for g in hidden_grads]
        seen["eps"] = build(hidden_grads)
        return seen["eps"]

    module.perturbation = recorded
    trainer = fit_steps(module, dm, 1)
    update = {n: before[n] - p.detach() for n, p in params.items()}
    return update, seen["eps"], seen["grads"], trainer


@pytest.mark.parametrize("rho", [0.5, 0.0])
def test_step_equals_independent_computation(tiny_formatter, rho):
    module, dm = vaccine_setup(tiny_formatter, rho=rho)
    batch = next(iter(dm.train_dataloader()))
    expected, expected_eps, _, _ = independent_vaccine_update(module.model, batch, rho)
    sft, _, _, _ = independent_vaccine_update(module.model, batch, 0.0)
    update, eps, _, _ = one_step(module, dm)
    for n in expected:
        torch.testing.assert_close(update[n], expected[n], rtol=1e-4, atol=1e-7)
    for e, x in zip(eps, expected_eps, strict=True):
        torch.testing.assert_close(e, x, rtol=1e-4, atol=1e-8)
    if rho == 0:  # no perturbation: the SFT gradient
        for n in sft:
            torch.testing.assert_close(update[n], sft[n], rtol=1e-5, atol=1e-8)
    else:
        assert any(not torch.allclose(update[n], sft[n]) for n in sft)


def test_perturbation_has_norm_rho_and_spares_padding(tiny_formatter):
    module, dm = vaccine_setup(tiny_formatter, rho=0.5)
    batch = next(iter(dm.train_dataloader()))
    _, eps, _, _ = one_step(module, dm)
    assert len(eps) == module.model.config.num_hidden_layers
    assert torch.sqrt(sum((e**2).sum() for e in eps)).item() == pytest.approx(0.5, rel=1e-5)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    for e in eps:
        assert e.shape[:2] == batch["input_ids"].shape
        assert torch.all(e[padding] == 0)
        assert e[~padding].abs().sum() > 0


def test_small_rho_raises_the_loss_by_rho_times_the_gradient_norm(tiny_formatter):
    """First-order ascent: f(w; ε) − f(w) ≈ ρ·N."""
    rho = 1e-3
    module, dm = vaccine_setup(tiny_formatter, rho=rho, lr=0.0)
    _, _, grads, trainer = one_step(module, dm)
    norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    metrics = trainer.callback_metrics
    increase = (metrics["train/perturbed_loss"] - metrics["train/loss"]).item()
    assert increase == pytest.approx(rho * norm, rel=0.05)


def test_no_hook_is_left_behind(tiny_formatter):
    module, dm = vaccine_setup(tiny_formatter)
    fit_steps(module, dm, 2)
    for m in module.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_perturbed_outputs_adds_epsilon_to_each_hooked_output_only():
    from helpers.training import tiny_lora

    model = tiny_lora()
    modules = attention_modules(model)
    ids = torch.tensor([[3, 7, 11, 5]])
    plain, layer_inputs = [], []
    handles = [
        m.register_forward_hook(lambda m, a, o: plain.append(o[0].detach())) for m in modules
    ]
    handles.append(
        model.base_model.model.model.layers[0].register_forward_pre_hook(
            lambda m, a, kw: layer_inputs.append(kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True,
        )
    )
    model(input_ids=ids)
    eps = [torch.randn_like(a) for a in plain]
    seen = []
    with perturbed_outputs(modules, eps):
        handles += [
            m.register_forward_hook(lambda m, a, o: seen.append(o[0].detach())) for m in modules
        ]
        model(input_ids=ids)
    for h in handles:
        h.remove()
    # layer 0's attention output is its plain output + ε_0 (later layers also see earlier ε's)
    torch.testing.assert_close(seen[0], plain[0] + eps[0])
    assert layer_inputs[0] is not None
    torch.testing.assert_close(layer_inputs[0], layer_inputs[1])  # the embeddings are untouched
    assert all(len(m._forward_hooks) == 0 for m in modules)


@pytest.mark.parametrize("target", list(HOOK_TARGETS))
def test_one_hooked_module_per_decoder_layer(target):
    from helpers.training import tiny_lora

    model = tiny_lora()
    found = hooked_modules(model, target)
    assert len(found) == model.config.num_hidden_layers == 2
    if target == "attention":
        assert found == attention_modules(model)


def test_other_hook_targets_train(tiny_formatter):
    for target in ("mlp", "layer"):
        module, dm = vaccine_setup(tiny_formatter, hook_target=target)
        update, eps, _, _ = one_step(module, dm)
        assert torch.sqrt(sum((e**2).sum() for e in eps)).item() == pytest.approx(0.5, rel=1e-5)
        assert all(torch.isfinite(u).all() for u in update.values())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rho": -1.0}, "rho=-1.0 must be a number >= 0"),
        ({"hook_target": "embeddings"}, "hook_target='embeddings' must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    problems = VaccineModule.hyperparameter_problems(kwargs)
    assert len(problems) == 1 and problems[0].startswith(message.split(" must")[0])
    with pytest.raises(InputError, match=message):
        VaccineModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)
