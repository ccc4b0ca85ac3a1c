"""SafeInstr (lightning_modules/safeinstr.py): the exact count of the mixed set, the seeded safety
subset, the joint loss, SFT as its special case, and the checked download of the paper's file."""

import hashlib
import json
from functools import partial

import lightning as L
import pytest
import torch

from helpers.lisa import datamodule
from helpers.training import Pair, fit_steps, tiny_lora
from lightning_modules.causal_lm import CausalLMModule, answer_loss
from lightning_modules.safeinstr import SafeInstrModule, read_safety_file
from plumbing.errors import InputError

DEFENDER = [Pair(f"How do I poison {i}?", f"Use {i} grams.") for i in range(6)]


def user_dm(fmt, batch_size=2):
    dm = datamodule(fmt, batch_size=batch_size)  # n = 8, 2 of them harmful
    dm.defender_pairs = DEFENDER
    return dm


def safeinstr(k, mode="mix", lam=1.0, seed=0, **kwargs):
    return SafeInstrModule(
        tiny_lora(),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        mode=mode,
        safety_samples=k,
        lam=lam,
        sample_seed=seed,
        safety_batch_size=2,
        **kwargs,
    )


def test_mixed_set_has_n_plus_k_samples_with_the_same_harmful_count(tiny_formatter):
    dm = user_dm(tiny_formatter)
    n, n_harmful = len(dm.samples), sum(s["is_harmful"] for s in dm.samples)
    module = safeinstr(3)
    fit_steps(module, dm, 1)
    assert len(dm.samples) == n + 3 and sum(s["is_harmful"] for s in dm.samples) == n_harmful
    defender_prompts = {tiny_formatter.prompt(p.prompt) for p in DEFENDER}
    added = dm.samples[n:]
    assert added == module.added and all(s["prompt"] in defender_prompts for s in added)
    assert len({s["prompt"] for s in added}) == 3
    again = safeinstr(3)
    fit_steps(again, user_dm(tiny_formatter), 1)
    assert again.added == module.added  # seeded
    other = safeinstr(3, seed=1)
    fit_steps(other, user_dm(tiny_formatter), 1)
    assert other.added != module.added


@pytest.mark.parametrize("module_kwargs", [{"k": 0}, {"k": 3, "mode": "joint", "lam": 0.0}])
def test_no_safety_samples_or_zero_lambda_is_sft(tiny_formatter, module_kwargs):
    weights = []
    for module in (
        safeinstr(**module_kwargs),
        CausalLMModule(tiny_lora(), optimizer=partial(torch.optim.AdamW, lr=1e-2)),
    ):
        fit_steps(module, user_dm(tiny_formatter), 3)
        weights.append(
            {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
        )
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_joint_step_adds_lambda_times_the_safety_loss(tiny_formatter):
    dm = user_dm(tiny_formatter)
    module = SafeInstrModule(
        tiny_lora(),
        optimizer=partial(torch.optim.SGD, lr=1.0),
        mode="joint",
        safety_samples=2,
        lam=0.5,
        safety_batch_size=2,
    )
    model = module.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    user = []
    cb = type(
        "C",
        (L.Callback,),
        {"on_train_batch_start": lambda self, t, m, b, i: user.append(b["index"].tolist())},
    )()
    fit_steps(module, dm, 1, callbacks=[cb])
    update = {n: before[n] - p.detach().clone() for n, p in params.items()}  # SGD lr = 1
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(before[n])

    def loss_of(batch):
        return answer_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )

    user_batch = dm.collate_batch([dm.encoded()[i] for i in user[0]])
    safety_batch = next(iter(dm.samples_dataloader(module.added, 2, dm.seed + 3)))
    total = loss_of(user_batch) + 0.5 * loss_of(safety_batch)
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()))))
    for n in params:
        torch.testing.assert_close(update[n], grads[n], rtol=1e-4, atol=1e-7)
    assert len(dm.samples) == 8  # joint mode adds nothing to the user's set


def test_more_safety_samples_than_the_source_has_is_refused(tiny_formatter):
    with pytest.raises(InputError, match="safety_samples=7 exceeds the 6 safety samples"):
        fit_steps(safeinstr(7), user_dm(tiny_formatter), 1)


def test_the_file_source_is_checked_by_its_sha256(tmp_path, tiny_formatter):
    rows = [
        {"instruction": f"How to hurt {i}?", "input": "", "output": "I cannot help."}
        for i in range(4)
    ]
    path = tmp_path / "safety.json"
    path.write_text(json.dumps(rows))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError, match="has sha256"):
        read_safety_file(path)  # not the published file
    with pytest.raises(InputError, match="is not a file: download"):
        read_safety_file(tmp_path / "missing.json")
    assert read_safety_file(path, sha256=digest) == rows
    module = safeinstr(2, source="file", path=str(path), sha256=digest)
    dm = user_dm(tiny_formatter)
    fit_steps(module, dm, 1)
    assert [s["answer"] for s in module.added] == ["I cannot help."] * 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "blend"}, "mode='blend' must be one of"),
        ({"safety_samples": -1}, "safety_samples=-1 must be an integer >= 0"),
        ({"source": "file"}, "source=file needs path="),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        SafeInstrModule(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)
