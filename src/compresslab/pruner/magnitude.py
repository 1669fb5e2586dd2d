"""Magnitude pruning: drop the smallest |W_ij| per output row (or per N:M group)."""

from __future__ import annotations

import torch
from torch import nn

from ..stages import layer_state
from .masks import check_sparsity, check_width, keep_mask, parse_pattern


def magnitude_mask(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    return keep_mask(W.abs().float(), sparsity, nm)


class Magnitude:
    """`pruner=magnitude`: `sparsity` (0.5) and `pattern` ('unstructured' or 'N:M', e.g. '2:4')."""

    needs = frozenset()

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured"):
        self.nm = parse_pattern(pattern)
        check_sparsity(sparsity, self.nm)
        self.sparsity = sparsity
        self.pattern = "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"

    def check(self, name: str, layer: nn.Module) -> None:
        check_width(name, layer.in_features, self.nm)

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats=None) -> None:
        mask = magnitude_mask(layer.weight.data, self.sparsity, self.nm)
        layer.weight.data.mul_(mask)
        layer_state(layer, create=True).pattern = self.pattern

    def __repr__(self):
        return f"Magnitude({self.pattern}, sparsity={self.sparsity})"
