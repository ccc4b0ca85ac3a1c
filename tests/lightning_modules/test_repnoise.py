"""RepNoise's alignment step pinned against independent computations on the tiny model (setups and
the independent arithmetic in tests/helpers/repnoise.py)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from helpers.repnoise import (
    RecordBatches,
    fit_recording,
    fixed_batches,
    independent_terms,
    loop_mask,
    reference_masked_ce,
    reference_mmd,
    repnoise_setup,
    trainable_copy,
)
from helpers.training import fit_steps, tiny_lora
from lightning_modules.repnoise import (
    ASCENT_MEANS,
    RepNoiseModule,
    decoder_parts,
    difference_mask,
    hyperparameter_problems,
    masked_token_ce,
    mmd,
)
from plumbing.errors import InputError


def assert_update(model, before, expected):
    """SGD with lr=1: θ_before − θ_after = the expected gradient; frozen tensors unchanged."""
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(before[n], p.detach())


def test_without_alpha_and_beta_the_step_is_the_masked_harmless_gradient(tiny_formatter):
    model, dm, module = repnoise_setup(tiny_formatter, alpha=0.0, beta=0.0)
    theta = trainable_copy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = fit_recording(module, dm, 1)
    harmful, harmless = steps[0]["harmful"], steps[0]["harmless"]
    assert harmful["input_ids"].shape[0] != harmless["input_ids"].shape[0]  # rows cut/padded
    assert harmful["input_ids"].shape[1] != harmless["input_ids"].shape[1]  # columns too
    mask = loop_mask(
        harmless["input_ids"],
        harmless["attention_mask"],
        harmful["input_ids"],
        harmful["attention_mask"],
    )
    logits = functional_call(
        model, theta, (harmless["input_ids"],), {"attention_mask": harmless["attention_mask"]}
    ).logits
    loss = reference_masked_ce(logits, harmless["input_ids"], mask)
    names = list(theta)
    assert_update(model, before, dict(zip(names, torch.autograd.grad(loss, list(theta.values())))))


@pytest.mark.parametrize("ascent_mean", ASCENT_MEANS)
def test_one_step_equals_an_independent_recomputation(tiny_formatter, ascent_mean):
    alpha, beta = 0.7, 5.0
    model, dm, module = repnoise_setup(
        tiny_formatter, alpha=alpha, beta=beta, ascent_mean=ascent_mean, noise_seed=3
    )
    theta = trainable_copy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = fit_recording(module, dm, 1)
    harmful, harmless = steps[0]["harmful"], steps[0]["harmless"]

    terms = independent_terms(model, theta, harmful, harmless, alpha, beta, ascent_mean, 3, 0)
    names = list(theta)
    grads = dict(zip(names, torch.autograd.grad(terms["loss"], [theta[n] for n in names])))
    assert_update(model, before, grads)

    # each term matters: the noise's and the ascent's gradients are far above the tolerance
    for part, weight in (("noise", beta), ("ascent_mean", alpha)):
        again = independent_terms(model, theta, harmful, harmless, alpha, beta, ascent_mean, 3, 0)
        g = torch.autograd.grad(weight * again[part], [theta[n] for n in names])
        assert max(x.abs().max().item() for x in g) > 1e-3, part
    n_hidden = len(terms["lens"])
    assert n_hidden == model.config.num_hidden_layers + 1
    numerator = terms["harmful_loss"] + sum(terms["lens"])
    expected_mean = numerator / n_hidden + 1 if ascent_mean == "reference" else numerator / 4
    assert terms["ascent_mean"].item() == pytest.approx(expected_mean.item(), rel=1e-6)


def test_logged_values_are_the_step_terms(tiny_formatter):
    model, dm, module = repnoise_setup(tiny_formatter, alpha=0.3, beta=2.0, lr=0.0)
    theta = trainable_copy(model)
    record = RecordBatches()
    trainer = fit_steps(module, dm, 1, callbacks=[record])
    step = record.steps[0]
    terms = independent_terms(
        model, theta, step["harmful"], step["harmless"], 0.3, 2.0, "reference", 0, 0
    )
    logged = trainer.callback_metrics
    for key in ("loss", "harmless_loss", "harmful_loss", "noise", "ascent_mean"):
        assert logged[f"train/{key}"].item() == pytest.approx(terms[key].item(), rel=1e-5), key


# --- the MMD -----------------------------------------------------------------------------------
def test_mmd_properties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g) * 2 + 0.3
    assert mmd(x, x).item() == 0.0
    assert mmd(x, y).item() > 0
    for _ in range(5):
        a, b = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
        assert mmd(a, b).item() >= 0
        assert mmd(a, b).item() == pytest.approx(mmd(b, a).item(), rel=1e-6)
    # the bandwidth follows the data at every call: scaling both sets changes nothing (a fixed
    # bandwidth would not be scale-free), and it matches the difference-tensor form
    assert mmd(10 * x, 10 * y).item() == pytest.approx(mmd(x, y).item(), rel=1e-5)
    assert mmd(0.01 * x, 0.01 * y).item() == pytest.approx(mmd(x, y).item(), rel=1e-5)
    assert mmd(x, y).item() == pytest.approx(reference_mmd(x, y).item(), rel=1e-5)
    # all points equal: the floored bandwidth gives 0, not NaN
    assert mmd(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_mmd_by_hand():
    """x = {0, 1}, y = {0, 2} on a line: squared distances 0-1: 1, 0-0: 0, 0-2: 4, 1-0: 1, 1-2: 1,
    0-2: 4 (each pair twice among 4·3 ordered pairs): b = 22/12; kernels at b·2^(i−2)."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    b = 22 / 12

    def k(d2):
        return sum(math.exp(-d2 / (b * 2 ** (i - 2))) for i in range(5))

    kxx = [[k(0), k(1)], [k(1), k(0)]]
    kyy = [[k(0), k(4)], [k(4), k(0)]]
    kxy = [[k(0), k(4)], [k(1), k(1)]]  # rows x, columns y
    value = sum(kxx[i][j] + kyy[i][j] - 2 * kxy[i][j] for i in range(2) for j in range(2)) / 4
    assert mmd(x, y).item() == pytest.approx(value, rel=1e-6)


def test_mmd_gradient_treats_the_bandwidth_as_a_constant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g, requires_grad=True)
    y = torch.randn(3, 6, generator=g)
    (gx,) = torch.autograd.grad(mmd(x, y), [x])
    (rx,) = torch.autograd.grad(reference_mmd(x, y), [x])
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-7)
    (gs,) = torch.autograd.grad(mmd(x, x.detach()), [x])  # zero distances: finite gradient
    assert torch.isfinite(gs).all()


# --- the ascent term ---------------------------------------------------------------------------
def test_gradient_of_the_log_ascent_is_alpha_over_mean_times_its_gradient(tiny_formatter):
    alpha = 0.7
    model, dm, module = repnoise_setup(tiny_formatter, alpha=alpha, beta=0.0)
    harmful, harmless = fixed_batches(tiny_formatter, dm)
    params = list(p for p in model.parameters() if p.requires_grad)
    terms = module.repnoise_terms(harmful, harmless, step=0)
    g_loss = torch.autograd.grad(terms["loss"], params, retain_graph=True)
    g_s = torch.autograd.grad(terms["harmless_loss"], params, retain_graph=True)
    g_h = torch.autograd.grad(terms["ascent_mean"], params)
    h_bar = terms["ascent_mean"].item()
    assert h_bar > 1  # the reference's +1
    for gl, gs, gh in zip(g_loss, g_s, g_h):
        torch.testing.assert_close(gl - gs, -(alpha / h_bar) * gh, rtol=1e-4, atol=1e-7)


def test_hidden_states_end_after_the_final_norm_and_parts_are_found_by_structure():
    """The module relies on it (as its reference did): HF appends the last hidden state after the
    final norm, so a lens that norms every hidden state norms the last one twice."""
    model = tiny_lora()
    mlps, norm, head = decoder_parts(model)
    llama = model.base_model.model
    assert mlps == [layer.mlp for layer in llama.model.layers]
    assert norm is llama.model.norm and head is llama.lm_head
    last = {}
    handle = llama.model.layers[-1].register_forward_hook(
        lambda m, a, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        out = model(input_ids=torch.tensor([[5, 9, 40, 7]]), output_hidden_states=True)
    finally:
        handle.remove()
    assert len(out.hidden_states) == len(mlps) + 1
    torch.testing.assert_close(out.hidden_states[-1], norm(last["h"]))
    assert not torch.allclose(out.hidden_states[-1], last["h"])
    with pytest.raises(InputError, match="decoder layers"):
        decoder_parts(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- masks -------------------------------------------------------------------------------------
def test_mask_excludes_padding_and_agreeing_real_tokens():
    """pad id = EOS id = 2: X_h's real EOS facing X_s's padding counts as different; X_h's own
    padding never counts; rows and columns beyond X_s count wherever X_h is real."""
    h = {
        "input_ids": torch.tensor([[5, 6, 2, 2, 2], [5, 8, 9, 2, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
    }
    s = {"input_ids": torch.tensor([[5, 7, 2]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(difference_mask(h, s), expected)
    assert torch.equal(difference_mask(s, h), torch.tensor([[0, 1, 0]], dtype=torch.bool))
    for a, b in ((h, s), (s, h)):
        loop = loop_mask(a["input_ids"], a["attention_mask"], b["input_ids"], b["attention_mask"])
        assert torch.equal(difference_mask(a, b), loop)


def test_masked_ce_ignores_masked_positions_and_keeps_token_zero():
    g = torch.Generator().manual_seed(0)
    V = 11
    ids = torch.tensor([[3, 0, 4, 5, 6]])  # a real token with id 0 counts
    mask = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    logits = torch.randn(1, 5, V, generator=g)
    value = masked_token_ce(logits, ids, mask).item()
    # kept targets: id 0 at 1 (logits at 0 zeroed: log V), id 4 at 2 (logits at 1), id 6 at 4
    # (logits at 3 zeroed: log V); the target at 3 has M = 0
    nll_4 = -torch.log_softmax(logits[0, 1], -1)[4].item()
    assert value == pytest.approx((math.log(V) + nll_4 + math.log(V)) / 3, rel=1e-6)
    assert value != pytest.approx((nll_4 + math.log(V)) / 2)  # the reference's "id != 0" rule
    assert value == pytest.approx(reference_masked_ce(logits, ids, mask).item(), rel=1e-6)

    changed_logits = logits.clone()
    for t in (0, 3, 4):  # M[t] = 0, or predicts nothing
        changed_logits[0, t] += 5 * torch.randn(V, generator=g)
    changed_ids = ids.clone()
    changed_ids[0, 0], changed_ids[0, 3] = 9, 10  # M = 0 targets
    assert masked_token_ce(changed_logits, changed_ids, mask).item() == pytest.approx(
        value, rel=1e-6
    )


def test_padding_token_ids_have_no_influence(tiny_formatter):
    model, dm, module = repnoise_setup(tiny_formatter, alpha=0.7, beta=5.0)
    harmful, harmless = fixed_batches(tiny_formatter, dm)
    params = [p for p in model.parameters() if p.requires_grad]

    def terms_and_grads(h, s):
        terms = module.repnoise_terms(h, s, step=0)
        return terms, torch.autograd.grad(terms["loss"], params)

    base_terms, base_grads = terms_and_grads(harmful, harmless)
    changed = []
    for batch in (harmful, harmless):
        batch = {k: v.clone() for k, v in batch.items()}
        padding = batch["attention_mask"] == 0
        assert padding.any()
        batch["input_ids"][padding] = 17
        changed.append(batch)
    terms, grads = terms_and_grads(*changed)
    for key, value in base_terms.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-9), key
    for g, b in zip(grads, base_grads):
        torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-8)


# --- hooks, noise seed, processes, settings ------------------------------------------------------
def forward_hooks(model):
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


def test_no_hook_remains_and_the_noise_is_seeded(tiny_formatter):
    model, dm, module = repnoise_setup(tiny_formatter, alpha=0.5, beta=1.0, lr=1e-2)
    harmful, harmless = fixed_batches(tiny_formatter, dm)
    # transformers installs its own output-capturing hooks once, at the first forward with
    # output_hidden_states=True, and keeps them: count from there
    with torch.no_grad():
        model(input_ids=harmful["input_ids"], output_hidden_states=True)
    hooks_before = forward_hooks(model)
    mlps = [name for name in hooks_before if name.endswith(".mlp")]
    assert len(mlps) == model.config.num_hidden_layers
    assert all(hooks_before[name] == 0 for name in mlps)
    fit_steps(module, dm, 2)
    assert forward_hooks(model) == hooks_before

    with torch.no_grad():
        first = module.repnoise_terms(harmful, harmless, step=4)
        second = module.repnoise_terms(harmful, harmless, step=4)
        other_step = module.repnoise_terms(harmful, harmless, step=5)
    assert first["loss"].item() == second["loss"].item()
    assert first["noise"].item() != other_step["noise"].item()
    assert forward_hooks(model) == hooks_before

    broken = {k: v.clone() for k, v in harmful.items()}
    broken["input_ids"][0, 0] = 10**6  # out of the vocabulary: the forward raises
    with pytest.raises(IndexError):
        module.repnoise_terms(broken, harmless, step=0)
    assert forward_hooks(model) == hooks_before


def test_several_processes_are_refused():
    module = RepNoiseModule(tiny_lora(), optimizer=torch.optim.SGD)
    module._trainer = SimpleNamespace(world_size=2, precision="bf16-mixed")
    with pytest.raises(InputError, match="one device") as error:
        module.on_fit_start()
    assert "nonlinear" in str(error.value)
    module._trainer = SimpleNamespace(world_size=1, precision="bf16-mixed")
    module.on_fit_start()


@pytest.mark.parametrize(
    "values,key",
    [
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"beta": -1}, "beta=-1"),
        ({"alpha": "x"}, "alpha='x'"),
        ({"ascent_mean": "mean"}, "ascent_mean='mean'"),
    ],
)
def test_bad_settings_are_refused_with_the_checks_messages(values, key):
    problems = hyperparameter_problems(values)
    assert len(problems) == 1 and problems[0].startswith(key)
    with pytest.raises(InputError) as error:
        RepNoiseModule(tiny_lora(), optimizer=torch.optim.SGD, **values)
    assert problems[0] in str(error.value)
    assert RepNoiseModule.hyperparameter_problems(values) == problems


def test_good_settings_have_no_problems():
    good = {"alpha": 0, "beta": 0.001, "ascent_mean": "corrected", "harmful_batch_size": 5}
    assert hyperparameter_problems(good) == []
