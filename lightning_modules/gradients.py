"""Gradient arithmetic over ALL trainable tensors at once, for defenses that take several
backward passes per step (Panacea, Antibody).

Every quantity here is one number over the whole parameter vector (docs/methods.md: one global L2
norm, not per layer), identical on every process:
- DDP: the gradients are already all-reduced by `manual_backward`, every rank holds all of them;
- FSDP2 (`fully_shard`): each rank holds one shard of every gradient (a DTensor); the sums over
  the local shards are all-reduced, once per quantity (not once per tensor).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor gathered (a collective: call on every rank), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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
