"""Gradient arithmetic over ALL trainable tensors at once, for defenses that take several
backward passes per step (Panacea, Antibody).

Every quantity here is one number over the whole parameter vector (METHODS.md: one global L2
norm, not per layer). Under DDP the gradients these functions see are already all-reduced by
`manual_backward`, so the results are identical on every rank.
"""

from __future__ import annotations

import torch


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ with a and b read as one flat vector each (computed in fp32)."""
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b, strict=True))


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together (not per layer)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖·‖b‖ + eps), the reference's form of the cosine."""
    return global_dot(a, b) / (global_norm(a) * global_norm(b) + eps)
