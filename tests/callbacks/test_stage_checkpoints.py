"""Checkpoints inside a training stage (callbacks/stage_checkpoints.py): a fit resumed from ANY of
its checkpoints (mid-epoch, at an epoch's end, mid-way through the defender's batches) ends with
exactly the weights, optimizer state and defense state of the uninterrupted fit; the files are
pruned to the newest K; a corrupt newest file is skipped for the one before."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import torch

from callbacks.stage_checkpoints import (
    StageCheckpoints,
    checkpoints_newest_first,
    latest_checkpoint,
)
from datamodules.supervised import SupervisedDataModule
from helpers.training import Pair
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.panacea import PanaceaModule
from plumbing.models import add_lora, build_tiny

EPOCHS, BATCH = 3, 4  # 3 batches per epoch: 9 steps


def build(tiny_formatter, defense: str, n_user: int = 10):
    """Dropout on, so that a resume that lost the RNG state would differ. 10 samples: the last
    batch of an epoch is short; 12: it is full (then the sampler is never run to its end)."""
    base, _ = build_tiny(init_seed=1)
    model = add_lora(base, r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "v_proj"], seed=0)
    users = [
        {
            "prompt": tiny_formatter.prompt(f"Review {i}: fine."),
            "answer": "positive",
            "is_harmful": i % 3 == 0,
        }
        for i in range(n_user)
    ]
    defender = [Pair(f"How do I do harm {i}?", f"Step one: harm {i}.") for i in range(5)]
    dm = SupervisedDataModule(
        users, tiny_formatter, batch_size=BATCH, seed=0, defender_pairs=defender
    )
    if defense == "lisa":  # Lisa draws alignment pairs from the fine-tuning datamodule
        from helpers.lisa import datamodule

        dm = datamodule(tiny_formatter, batch_size=BATCH, n=n_user)
    return model, dm, module_for(defense, model)


def module_for(defense: str, model):
    """Each training part with small hyperparameters whose state changes within 9 steps: the
    defender's 5 pairs drawn 2 per step wrap mid-epoch, T-Vaccine draws its layer every 2 steps
    and probes every 3, Lisa switches mode every 2 steps."""
    from lightning_modules.antibody import AntibodyAlignModule, WeightedSFTModule
    from lightning_modules.booster import BoosterModule
    from lightning_modules.ldifs import LDIFSModule
    from lightning_modules.lisa import LisaModule
    from lightning_modules.repnoise import RepNoiseModule
    from lightning_modules.safeinstr import SafeInstrModule
    from lightning_modules.t_vaccine import TVaccineModule
    from lightning_modules.vaccine import VaccineModule

    common = dict(
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), max_grad_norm=1.0
    )
    parts = {
        "sft": lambda: CausalLMModule(model, **common),
        "panacea": lambda: PanaceaModule(model, rho=0.5, lam=0.5, harmful_batch_size=2, **common),
        "antibody_align": lambda: AntibodyAlignModule(model, harmful_batch_size=2, **common),
        "antibody_weighting": lambda: WeightedSFTModule(model, score_batch_size=4, **common),
        "booster": lambda: BoosterModule(model, harmful_batch_size=2, **common),
        "vaccine": lambda: VaccineModule(model, rho=0.5, **common),
        "t_vaccine": lambda: TVaccineModule(
            model, rho=0.5, active_layers=1, switch_every=2, probe_every=3, **common
        ),
        "repnoise": lambda: RepNoiseModule(model, harmful_batch_size=2, **common),
        "safeinstr": lambda: SafeInstrModule(
            model, mode="joint", safety_samples=3, safety_batch_size=2, **common
        ),
        "ldifs": lambda: LDIFSModule(model, rho=0.5, **common),
        "lisa": lambda: LisaModule(
            model, rho=0.5, align_steps=2, finetune_steps=2, alignment_batch_size=2, **common
        ),
    }
    return parts[defense]()


def fit(module, dm, callbacks=(), ckpt_path=None):
    import lightning as L

    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),  # Lightning's switch for Checkpoint callbacks
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    torch.manual_seed(0)  # as the run's seed_everything before each fit
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def adapter(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "defense,n_user",
    [("sft", 10), ("sft", 12), ("panacea", 10), ("panacea", 12)]
    + [
        (d, 10)
        for d in (
            "antibody_align",
            "antibody_weighting",
            "booster",
            "vaccine",
            "t_vaccine",
            "repnoise",
            "safeinstr",
            "ldifs",
            "lisa",
        )
    ],
)
def test_a_fit_resumed_from_any_checkpoint_ends_as_the_uninterrupted_one(
    tiny_formatter, tmp_path, defense, n_user
):
    model, dm, module = build(tiny_formatter, defense, n_user)
    trainer = fit(module, dm, [StageCheckpoints(tmp_path, every_n_steps=1, keep_last=100)])
    expected = adapter(model)
    expected_optimizer = trainer.optimizers[0].state_dict()["state"]
    saved = checkpoints_newest_first(tmp_path)
    assert [p.name for p in saved][0] == "step-00000009.ckpt" and len(saved) == 9
    assert not list(tmp_path.glob(".*.tmp"))
    for path in saved[1:]:  # the last one has nothing left to do
        model_r, dm_r, module_r = build(tiny_formatter, defense, n_user)
        resumed = fit(
            module_r, dm_r, [StageCheckpoints(tmp_path / "resumed", 1, 1)], ckpt_path=path
        )
        assert resumed.global_step == 9
        for name, value in adapter(model_r).items():
            assert torch.equal(value, expected[name]), f"{path.name}: {name}"
        state = resumed.optimizers[0].state_dict()["state"]
        for i, slot in expected_optimizer.items():
            assert torch.equal(state[i]["exp_avg_sq"], slot["exp_avg_sq"]), path.name
        # the defense's own state (ε, λ_t and histories, drawn batches, T-Vaccine's layers,
        # Lisa's anchors...): what its on_save_checkpoint writes, compared value by value
        assert same(module_state(module_r), module_state(module)), path.name
    if defense == "panacea":
        assert module.harmful.drawn == 9 and module.epsilon


@pytest.mark.parametrize("defense", ["panacea", "safeinstr", "lisa"])
def test_a_checkpoint_of_the_older_format_resumes_exactly(tiny_formatter, tmp_path, defense):
    """Checkpoints written before the cycled batches' counts moved into `batches_drawn` held one
    key per module; a stage killed under that code resumes with them."""
    model, dm, module = build(tiny_formatter, defense)
    fit(module, dm, [StageCheckpoints(tmp_path, every_n_steps=1, keep_last=100)])
    expected = adapter(model)
    path = next(p for p in checkpoints_newest_first(tmp_path) if p.name == "step-00000004.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    drawn = checkpoint.pop("batches_drawn")
    assert drawn and all(count > 0 for count in drawn.values())  # mid-way through each stream
    if "harmful" in drawn:
        checkpoint["harmful_batches_drawn"] = drawn["harmful"]
    if "safety" in drawn:
        checkpoint["safety_batches_drawn"] = drawn["safety"]
    if "alignment" in drawn:
        checkpoint["lisa"]["alignment_batches_drawn"] = drawn["alignment"]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    model_r, dm_r, module_r = build(tiny_formatter, defense)
    resumed = [StageCheckpoints(tmp_path / "resumed", 1, 1)]  # (it restores the RNG states)
    fit(module_r, dm_r, resumed, ckpt_path=tmp_path / "older.ckpt")
    for name, value in adapter(model_r).items():
        assert torch.equal(value, expected[name]), name


def module_state(module) -> dict:
    from orchestration.stages import module_state as state

    return state(module)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_checkpoints_hold_the_adapter_not_the_base_and_are_pruned(tiny_formatter, tmp_path):
    model, dm, module = build(tiny_formatter, "sft")
    fit(module, dm, [StageCheckpoints(tmp_path, every_n_steps=4, keep_last=2)])
    # steps 3, 4, 6, 8, 9 were saved (every 4, and each epoch's last); the newest 2 remain
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == [
        "step-00000009.ckpt",
        "step-00000008.ckpt",
    ]
    checkpoint = torch.load(tmp_path / "step-00000009.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in adapter(model)}
    assert checkpoint["rng_states"]["cpu"].shape[0] == 1  # one process


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_one_before(
    tiny_formatter, tmp_path, caplog
):
    model, dm, module = build(tiny_formatter, "sft")
    fit(module, dm, [StageCheckpoints(tmp_path, every_n_steps=1, keep_last=3)])
    newest = tmp_path / "step-00000009.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as a write cut short by a full disk
    with caplog.at_level(logging.WARNING, logger="run"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000008.ckpt"
    assert "skipped checkpoint" in caplog.text and "step-00000009.ckpt" in caplog.text
    assert latest_checkpoint(tmp_path / "absent") is None


def test_a_checkpoint_of_another_adapter_layout_is_refused(tiny_formatter, tmp_path):
    from plumbing.errors import InputError

    model, dm, module = build(tiny_formatter, "sft")
    fit(module, dm, [StageCheckpoints(tmp_path, every_n_steps=None, keep_last=1)])
    base, _ = build_tiny(init_seed=1)
    other = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj"], seed=0)
    module_o = CausalLMModule(other, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    with pytest.raises(InputError, match="lacks .* adapter tensors"):
        fit(
            module_o,
            dm,
            [StageCheckpoints(tmp_path, None, 1)],
            ckpt_path=latest_checkpoint(tmp_path),
        )


def test_the_resumable_loader_shuffles_as_the_plain_one():
    """Results of runs from before it came are reproduced: the same batches, epoch after epoch."""
    from torch.utils.data import DataLoader

    from datamodules.resumable import ResumableDataLoader

    def orders(loader_class):
        loader = loader_class(
            list(range(10)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
        )
        return [[b.tolist() for b in loader] for _ in range(3)]

    assert orders(ResumableDataLoader) == orders(DataLoader)


def test_the_preemption_signal_saves_a_checkpoint_then_reaches_the_previous_handler(
    tiny_formatter, tmp_path
):
    """SIGUSR2 (submitit's preemption signal) in the middle of step 2: the step ends, step 2's
    checkpoint is written, then the handler that was installed before (submitit's requeue) runs."""
    import os
    import signal

    import lightning as L

    class SignalAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR2)

    calls = []
    previous = signal.signal(
        signal.SIGUSR2,
        lambda signum, frame: calls.append(
            (signum, sorted(p.name for p in tmp_path.glob("*.ckpt")))
        ),
    )
    try:
        model, dm, module = build(tiny_formatter, "sft")
        fit(
            module,
            dm,
            [SignalAtStep(), StageCheckpoints(tmp_path, every_n_steps=None, keep_last=9)],
        )
        assert calls == [(signal.SIGUSR2, ["step-00000002.ckpt"])]  # handed on after the save
        names = [p.name for p in checkpoints_newest_first(tmp_path)]
        assert names == [
            "step-00000009.ckpt",
            "step-00000006.ckpt",
            "step-00000003.ckpt",
            "step-00000002.ckpt",
        ]
        os.kill(os.getpid(), signal.SIGUSR2)  # outside training: straight to the previous handler
        assert len(calls) == 2
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _fit_in_one_of_two_processes(rank: int, port: int, out_dir: str, resume_from: str | None):
    """One DDP process (gloo) of a Panacea fit with checkpoints, started as torchrun would."""
    import lightning as L

    from datamodules.formatting import PromptFormatter
    from helpers.training import as_one_of_two_processes, leave_the_group
    from plumbing.models import load_tiny_tokenizer

    as_one_of_two_processes(rank, port)
    formatter = PromptFormatter(load_tiny_tokenizer(), "chat", max_length=96)
    model, dm, module = build(formatter, "panacea", n_user=12)
    out = Path(out_dir)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StageCheckpoints(out / ("again" if resume_from else "first"), 1, 100)],
    )
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=False)
    final = {"adapter": adapter(model), "epsilon": module.epsilon, "drawn": module.harmful.drawn}
    torch.save(final, out / f"{'resumed' if resume_from else 'whole'}_rank{rank}.pt")
    leave_the_group()


@pytest.mark.e2e
def test_a_ddp_fit_resumes_exactly_on_every_process(tmp_path):
    """2 processes, each its own shard of the data, of the defender's batches and its own RNG
    stream (dropout): resumed from a mid-epoch checkpoint, both end as the uninterrupted fit."""
    import torch.multiprocessing as mp

    from helpers.training import _free_port

    mp.spawn(_fit_in_one_of_two_processes, args=(_free_port(), str(tmp_path), None), nprocs=2)
    saved = checkpoints_newest_first(tmp_path / "first")
    assert len(saved) == 6  # 6 samples per process, batches of 4: 2 steps per epoch
    assert torch.load(saved[0], weights_only=False)["rng_states"]["cpu"].shape[0] == 2
    middle = tmp_path / "first" / "step-00000003.ckpt"  # the first step of the second epoch
    mp.spawn(
        _fit_in_one_of_two_processes, args=(_free_port(), str(tmp_path), str(middle)), nprocs=2
    )
    for rank in (0, 1):
        whole = torch.load(tmp_path / f"whole_rank{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=False)
        assert resumed["drawn"] == whole["drawn"] == 6
        for part in ("adapter", "epsilon"):
            assert all(torch.equal(resumed[part][k], v) for k, v in whole[part].items()), (
                rank,
                part,
            )
