"""Wanda: prune by |W_ij|·‖X_j‖₂ (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024), compared within each output row or each N:M group."""

from __future__ import annotations

import torch

from .base import Pruner


def shift_zero_norms(norm: torch.Tensor) -> torch.Tensor:
    """Raise input channels whose norm is exactly zero to the smallest non-zero norm, so their
    weights are ranked by magnitude instead of all tying at score 0 (the SLiM seed's
    `shift_zero_metrics` option for dead channels)."""
    nz = norm[norm > 0]
    if nz.numel() == 0 or nz.numel() == norm.numel():
        return norm
    return torch.where(norm > 0, norm, nz.min())


def wanda_scores(W: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ for W (out, in) and act_norm (in,)."""
    return W.abs().float() * act_norm.float()[None, :]


class Wanda(Pruner):
    """`pruner=wanda`: `sparsity`, `pattern`, `shift_zero_metrics` (true, as the SLiM seed runs it)."""

    needs = frozenset({"act_norm"})

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", shift_zero_metrics: bool = True):
        super().__init__(sparsity, pattern)
        self.shift_zero_metrics = shift_zero_metrics

    def scores(self, name, W, stats):
        norm = stats.act_norm
        if self.shift_zero_metrics:
            norm = shift_zero_norms(norm)
        return wanda_scores(W, norm)
