"""The post-fine-tuning transforms (lightning_modules/post_transforms.py): Panacea's ε added to the
fine-tuned weights, and the random perturbation's intensity."""

import pytest
import torch

from callbacks.diagnostics import epsilon_norms, layer_norms
from helpers.panacea import RHO, setup
from helpers.training import fit_steps as fit
from lightning_modules.post_transforms import AddGaussianNoise, AddPanaceaEpsilon


def test_deployed_weights_are_fine_tuned_plus_epsilon(tiny_formatter, tmp_path):
    model, dm, module = setup(tiny_formatter, lr=1e-3, optimizer=torch.optim.AdamW)
    fit(module, dm, steps=2)
    w_T = {n: p.detach().clone() for n, p in model.named_parameters()}
    AddPanaceaEpsilon()(model, module)
    for n, p in model.named_parameters():
        expected = w_T[n] + module.epsilon[n] if n in module.epsilon else w_T[n]
        assert torch.equal(p.detach(), expected)
    rows = layer_norms(module.epsilon)
    assert {(r["layer"], r["module"]) for r in rows} == {
        (i, m) for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    assert sum(r["norm"] ** 2 for r in rows) == pytest.approx(RHO**2, rel=1e-4)
    assert epsilon_norms(module, tmp_path, logger=None)["epsilon_norm"] == pytest.approx(
        RHO, rel=1e-4
    )
    assert (tmp_path / "epsilon_layer_norms.png").stat().st_size > 0
    assert (tmp_path / "epsilon_layer_norms.csv").read_text().startswith("layer,module,norm")


def test_random_perturbation_has_the_given_intensity(tiny_formatter, tmp_path):
    model, _, _ = setup(tiny_formatter)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    AddGaussianNoise(intensity=0.05, seed=0)(model)
    deltas = torch.cat(
        [(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if p.requires_grad]
    )
    frozen_same = all(
        torch.equal(p.detach(), before[n])
        for n, p in model.named_parameters()
        if not p.requires_grad
    )
    assert frozen_same and deltas.std().item() == pytest.approx(0.05, rel=0.1)
