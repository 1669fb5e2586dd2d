"""Magnitude pruning: drop the smallest |W_ij| per output row (or per N:M group)."""

from __future__ import annotations

import torch

from .base import Pruner
from .masks import keep_mask


def magnitude_mask(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    return keep_mask(W.abs().float(), sparsity, nm)


class Magnitude(Pruner):
    """`pruner=magnitude`: `sparsity` (0.5) and `pattern` ('unstructured' or 'N:M', e.g. '2:4')."""

    def scores(self, name, W, stats=None):
        return W.abs()
