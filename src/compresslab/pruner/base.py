"""What every pruner shares: `sparsity`, `pattern`, the width check, and applying a mask."""

from __future__ import annotations

import torch
from torch import nn

from ..stages import layer_state
from .masks import check_sparsity, check_width, keep_mask, parse_pattern

DENSE = "dense"  # an allocation's per-layer pattern level: the layer stays unpruned (N:M vs dense per layer)


class Pruner:
    """Base of `pruner=...` stages. Subclasses implement `scores(name, W, stats)` (higher = keep),
    or override `prune(name, W, stats) -> (W_hat, keep)` for methods that also update weights."""

    needs: frozenset[str] = frozenset()

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured"):
        self.nm = parse_pattern(pattern)
        if self.nm is not None and sparsity is None:
            sparsity = 1 - self.nm[0] / self.nm[1]
        check_sparsity(sparsity, self.nm)
        self.sparsity = sparsity
        self.pattern = "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"

    def check(self, name: str, layer: nn.Module) -> None:
        check_width(name, layer.in_features, self.nm)

    def check_level(self, key: str, value) -> None:
        """An allocation's per-layer `sparsity` or `pattern` (allocation/): the range __init__ enforces."""
        if key == "sparsity":
            check_sparsity(value, self.nm)
        elif key == "pattern" and value != DENSE:
            parse_pattern(value)

    def set_level(self, key: str, value) -> None:
        """Take an allocation's level (stages.with_levels, on a copy): a `pattern` level ('N:M' or 'dense')
        sets the pattern, its N:M and its sparsity together."""
        if key == "pattern":
            self.nm = None if value == DENSE else parse_pattern(value)
            self.sparsity = 0.0 if self.nm is None else 1 - self.nm[0] / self.nm[1]
            self.pattern = DENSE if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
        else:
            setattr(self, key, value)

    @property
    def dense(self) -> bool:
        """This layer's level leaves it unpruned (allocation: N:M vs dense)."""
        return self.pattern == DENSE

    def scores(self, name: str, W: torch.Tensor, stats) -> torch.Tensor:
        raise NotImplementedError

    def prune(self, name: str, W: torch.Tensor, stats, numerics: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned W, keep-mask); Hessian-based pruners append their obs.Numerics to `numerics`."""
        keep = keep_mask(self.scores(name, W, stats).float(), self.sparsity, self.nm)
        return W * keep, keep

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats=None) -> None:
        if self.dense:
            return
        state = layer_state(layer, create=True)
        W_hat, keep = self.prune(name, layer.weight.data.float(), stats, state.numerics)
        layer.weight.data.copy_(W_hat.to(layer.weight.dtype))
        state.pattern, state.mask = self.pattern, keep.bool()

    def __repr__(self):
        return f"{type(self).__name__}({self.pattern}, sparsity={self.sparsity})"
