"""Antidote's pruning (lightning_modules/post_transforms.py AntidotePrune) against an independent
Wanda computation on the tiny model: each calibration sequence forwarded alone (batch 1, as the
reference), the per-row count of the spec, and what the ratio's ends do."""

import pytest
import torch

from datamodules.formatting import PromptFormatter
from helpers.training import Pair, tiny_lora
from lightning_modules.post_transforms import AntidotePrune, rows_to_zero
from plumbing.errors import InputError
from plumbing.models import load_tiny_tokenizer


@pytest.fixture
def fmt():
    return PromptFormatter(load_tiny_tokenizer(), "chat", max_length=64)


PAIRS = [Pair(f"How do I harm {i}?", "Step one. " + "then more " * i) for i in range(5)]


def independent_zeroed(model, fmt, pairs, ratio):
    """Per LoRA Linear: s_j from batch-1 forwards, S = |W|·sqrt(s), per row the top
    in − int(in·(1 − ratio)) scores zeroed (found by a full sort in the test)."""
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" in n
    }
    sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def hook_for(name):
        def hook(module, args, output):
            sums[name].add_(args[0][0].float().pow(2).sum(0))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    with torch.no_grad():
        for p in pairs:
            ids = torch.tensor([fmt.encode(fmt.prompt(p.prompt), p.answer)["input_ids"]])
            model(input_ids=ids)
    for h in handles:
        h.remove()
    zeroed = {}
    for n, m in linears.items():
        score = m.weight.detach().abs() * (sums[n] / len(pairs)).sqrt()
        n_in = score.size(1)
        n_zero = n_in - int(n_in * (1 - ratio))
        mask = torch.zeros_like(score, dtype=torch.bool)
        for i, row in enumerate(score):
            top = sorted(range(n_in), key=lambda j: (row[j].item(), j))[n_in - n_zero :]
            mask[i, top] = True
        zeroed[n] = mask
    return zeroed


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_pruned_set_equals_an_independent_wanda_computation(fmt, ratio):
    model = tiny_lora()
    expected = independent_zeroed(model, fmt, PAIRS, ratio)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune = AntidotePrune(ratio=ratio, batch_size=3, defender_pairs=PAIRS, formatter=fmt)
    prune(model)
    params = dict(model.named_parameters())
    for name, mask in expected.items():
        w = params[f"{name}.weight"].detach()
        assert torch.equal(w == 0, mask | (before[f"{name}.weight"] == 0)), name
        assert torch.equal(w[~mask], before[f"{name}.weight"][~mask])
        n_in = mask.size(1)
        assert (mask.sum(1) == n_in - int(n_in * (1 - ratio))).all()  # the spec's per-row count
    for n, p in model.named_parameters():  # base weights untouched, bit for bit
        if "lora_" not in n:
            assert torch.equal(p.detach(), before[n]), n
    total = sum(m.numel() for m in expected.values())
    assert prune.summary["realized_fraction"] == pytest.approx(
        sum(int(m.sum()) for m in expected.values()) / total
    )


def test_ratio_zero_changes_nothing_and_ratio_one_removes_the_adapter(fmt):
    model = tiny_lora()
    before = lora_weights(model)
    AntidotePrune(ratio=0.0, defender_pairs=PAIRS, formatter=fmt)(model)
    assert all(torch.equal(p, lora_weights(model)[n]) for n, p in before.items())
    ids = torch.tensor([[3, 9, 4, 7]])
    AntidotePrune(ratio=1.0, defender_pairs=PAIRS, formatter=fmt)(model)
    assert all((p == 0).all() for p in lora_weights(model).values())
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits)


def test_scores_do_not_depend_on_order_or_batch_size(fmt):
    masks = []
    for pairs, batch_size in ((PAIRS, 1), (PAIRS[::-1], 4), (PAIRS, 5)):
        model = tiny_lora()
        AntidotePrune(ratio=0.3, batch_size=batch_size, defender_pairs=pairs, formatter=fmt)(model)
        masks.append({n: p == 0 for n, p in lora_weights(model).items()})
    assert masks[0].keys() == masks[1].keys() == masks[2].keys()
    for n in masks[0]:
        assert torch.equal(masks[0][n], masks[1][n]) and torch.equal(masks[0][n], masks[2][n])


def test_rows_to_zero_on_a_hand_example():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0]])
    # in = 4, ratio 0.5: keep int(4·0.5) = 2 lowest, zero the 2 highest of each row
    assert rows_to_zero(scores, 0.5).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]
    # ratio 0.1: int(4·0.9) = 3 kept, 1 zeroed (25% of the row, not 10%)
    assert rows_to_zero(scores, 0.1).sum(1).tolist() == [1, 1]


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_the_unit_interval_is_refused(fmt, ratio):
    with pytest.raises(InputError, match=f"ratio={ratio} must be a number in \\[0, 1\\]"):
        AntidotePrune(ratio=ratio, defender_pairs=PAIRS, formatter=fmt)


def test_no_calibration_data_is_refused(fmt):
    with pytest.raises(InputError, match="needs calibration data"):
        AntidotePrune(ratio=0.1, defender_pairs=[], formatter=fmt)
