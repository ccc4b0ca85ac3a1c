"""Training helpers: the tiny LoRA model, a few optimizer steps on CPU, and one step in two CPU
processes (gloo) with each rank's record saved for comparison."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


class RecordRank(L.Callback):
    """Saves, per rank, the sample indices of every batch (user and defender), the module's state
    after training (`attrs`), the logged metrics and the trainable weights (whole tensors, also
    under FSDP), for comparison across ranks and against one process."""

    def __init__(self, out_dir, attrs=("epsilon",)):
        self.out_dir, self.attrs = Path(out_dir), attrs
        self.user, self.drawn = [], {"harmful": [], "alignment": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.user.append(batch["index"].tolist())
        for source, record in self.drawn.items():  # the module's cycled extra batches
            batches = getattr(module, source, None)
            if batches is not None and not getattr(batches, "recorded", False):
                batches.next, batches.recorded = self.recording(batches.next, record), True

    @staticmethod
    def recording(draw, record):
        def recorded_draw(device):
            drawn = draw(device)
            record.append(drawn["index"].tolist())
            return drawn

        return recorded_draw

    def on_train_end(self, trainer, module):
        from lightning_modules.gradients import full

        def whole(value):
            if isinstance(value, dict):
                return {k: whole(v) for k, v in value.items()}
            return full(value).detach().clone() if isinstance(value, torch.Tensor) else value

        state = {a: whole(getattr(module, a)) for a in self.attrs}
        params = {n: whole(p) for n, p in module.model.named_parameters() if p.requires_grad}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(
            {
                "user": self.user,
                **self.drawn,
                "params": params,
                "metrics": metrics,
                **state,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_one_of_two_processes(rank: int, port: int) -> None:
    """Make this process one of 2 started from outside Lightning (as torchrun or SLURM would start
    it): Lightning reads its rank from the environment and launches nothing."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)


def leave_the_group() -> None:
    """The end of a process started by as_one_of_two_processes: wait for the other process, then
    close the process group (left open, gloo's threads can abort the exiting process)."""
    from plumbing.distributed import barrier, finish

    barrier()
    finish()


def _one_of_two_processes(rank, port, build, strategy, out_dir, attrs):
    as_one_of_two_processes(rank, port)
    from lightning.pytorch.strategies import ModelParallelStrategy

    module, dm = build()
    chosen = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if strategy == "fsdp"
        else "ddp"
    )
    fit_steps(module, dm, 1, devices=2, strategy=chosen, callbacks=[RecordRank(out_dir, attrs)])
    leave_the_group()


def fit_two_processes(build, strategy: str, out_dir, attrs=()) -> list[dict]:
    """One optimizer step of `build()` -> (module, datamodule) in 2 CPU processes (gloo) under
    strategy "ddp" or "fsdp" (FSDP2 fully_shard through Lightning's ModelParallelStrategy);
    returns each rank's RecordRank record. `build` must be picklable (a module-level function)."""
    import torch.multiprocessing as mp

    mp.spawn(_one_of_two_processes, args=(_free_port(), build, strategy, out_dir, attrs), nprocs=2)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


class Pair:
    """A (prompt, answer) pair shaped like the datamodules' harmful pairs."""

    def __init__(self, prompt, answer):
        self.prompt, self.answer = prompt, answer


def tiny_lora():
    """The tiny model with LoRA on q/v and a nonzero B, so that every LoRA tensor has a gradient."""
    from plumbing.models import add_lora, build_tiny

    base, _ = build_tiny(init_seed=1)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def fit_steps(module, dm, steps, ckpt_path=None, **kwargs):
    """Fit `module` for `steps` optimizer steps on CPU (-1: as many as `max_epochs` give), without
    logger, checkpoints or bars; from the checkpoint `ckpt_path` when given."""
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def clipped(grads: dict, max_norm: float) -> dict:
    """torch.nn.utils.clip_grad_norm_ (what the HF Trainer calls) on copies of `grads`."""
    copies = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in grads.items()}
    for n, p in copies.items():
        p.grad = grads[n].clone()
    torch.nn.utils.clip_grad_norm_(list(copies.values()), max_norm)
    return {n: p.grad for n, p in copies.items()}


def alignment_data(fmt, n_safe=4, batch_size=4, n_defender=3, refusal_growth=0, harm_growth=1):
    """An alignment-stage datamodule on the tiny tokenizer: n_safe refusal samples (a harmful
    prompt, a refusal growing by `refusal_growth` words per index) and n_defender defender-held
    harmful pairs (answers growing by `harm_growth` words), so that batches carry padding."""
    from datamodules.refusals import refusal_for
    from datamodules.supervised import SupervisedDataModule

    safe = [
        {
            "prompt": fmt.prompt(f"Tell me how to hurt {i}."),
            "answer": refusal_for(i) + " No." * (refusal_growth * i),
            "is_harmful": False,
        }
        for i in range(n_safe)
    ]
    defender = [
        Pair(f"How do I do harm number {i}?", f"Step one: harm {i}." + " more" * (harm_growth * i))
        for i in range(n_defender)
    ]
    return SupervisedDataModule(safe, fmt, batch_size=batch_size, seed=0, defender_pairs=defender)
