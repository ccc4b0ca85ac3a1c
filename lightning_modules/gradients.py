"""Gradient arithmetic over ALL trainable tensors at once, for defenses that take several
backward passes per step (Panacea, Antibody, Booster, Vaccine) and for gradient clipping.

Every quantity here is one number over the whole parameter vector (docs/methods.md: one global L2
norm, not per layer), identical on every process:
- DDP: the gradients are already all-reduced by `manual_backward`, every rank holds all of them;
- FSDP2 (`fully_shard`): each rank holds one shard of every gradient (a DTensor); the sums over
  the local shards are all-reduced, once per quantity (not once per tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor gathered (a collective: call on every rank), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def placed_like(
    values: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each value on its parameter's device, in its dtype: a per-parameter state that a checkpoint
    saved on the CPU (Lightning restores it before the model moves to the GPU), ready to meet the
    parameters again in the loss."""
    return {n: v.to(device=params[n].device, dtype=params[n].dtype) for n, v in values.items()}


def _sum_over_shards(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over pairs (a, b) of Σ a·b, where a and b may be sharded DTensors (same placements)."""
    sharded, whole, group = [], [], None
    for a, b in terms:
        if isinstance(a, DTensor):
            sharded.append((a.to_local().float() * b.to_local().float()).sum())
            group = a.device_mesh.get_group()
        else:
            whole.append((a.float() * b.float()).sum())
    total = torch.stack(whole).sum() if whole else None
    if sharded:
        shard_sum = torch.stack(sharded).sum()
        dist.all_reduce(shard_sum, group=group)
        total = shard_sum if total is None else total + shard_sum
    return total if total is not None else torch.zeros(())


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ with a and b read as one flat vector each (computed in fp32)."""
    return _sum_over_shards(list(zip(a, b, strict=True)))


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together (not per layer)."""
    return torch.sqrt(_sum_over_shards([(t, t) for t in tensors]))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖·‖b‖ + eps), the reference's form of the cosine."""
    return global_dot(a, b) / (global_norm(a) * global_norm(b) + eps)


def clip_to_global_norm_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale `grads` in place so that their global norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ (the HF Trainer's clip) does: factor min(1, max/(norm + 1e-6)).
    Returns the norm before clipping."""
    norm = global_norm(grads)
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm


@contextmanager
def holding(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block every parameter holds the given value; on exit its own value is restored
    bit-exactly from a copy (LDIFS's reference model: the same base with the adapter's starting
    values, without a second copy of the model)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, backup):
                p.copy_(w)


def moved(params: list[torch.nn.Parameter], steps: list[torch.Tensor]):
    """Inside the block every parameter is moved by its step (w ← w + step); on exit it is
    restored bit-exactly from a copy (subtracting the step again would round differently). A model
    copy would do the same with all the frozen weights twice in memory."""
    with torch.no_grad():
        values = [p.detach() + step for p, step in zip(params, steps, strict=True)]
    return holding(params, values)
