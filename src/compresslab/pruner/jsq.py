"""JSQ's pruning score (Guo et al., "Compressing Large Language Models by Joint Sparsification and
Quantization", ICML 2024), as the SLiM seed runs it.

S_ij = |W_ij|·‖X̃_j‖₂ + ρ·A_ij, where X̃ is the input with its top 1% |x| clipped (the
activation editor) and A_ij, the sensitivity to the output range, is the range over tokens of
X̄·Wᵢᵀ with input channel j removed (X̄: the mean over calibration samples of the clipped (T, d)
input sequence). ρ = 2.1 is the seed's default.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Pruner


def range_salience(mean_seq: torch.Tensor, W: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
    """A (out, in): A[o, j] = max_t Y'[t, o] − min_t Y'[t, o] with Y' = X̄Wᵀ − X̄[:, j]·W[o, j].

    mean_seq (T, in), W (out, in). The removal of channel j is a rank-1 correction, computed in
    chunks of input channels so the (T, out, chunk) temporary stays under `max_elems`."""
    X = mean_seq.float()
    W = W.float()
    T, d = X.shape
    out = W.shape[0]
    Y = X @ W.T  # (T, out)
    A = torch.empty_like(W)
    chunk = max(1, max_elems // (T * out))
    for s in range(0, d, chunk):
        e = min(s + chunk, d)
        Yj = Y[:, :, None] - X[:, None, s:e] * W[None, :, s:e]  # (T, out, c)
        A[:, s:e] = Yj.amax(0) - Yj.amin(0)
    return torch.nan_to_num(A, posinf=100.0)


def jsq_scores(W: torch.Tensor, clipped_norm: torch.Tensor, mean_seq: torch.Tensor, rho: float) -> torch.Tensor:
    return W.abs().float() * clipped_norm.float()[None, :] + rho * range_salience(mean_seq, W)


class JSQ(Pruner):
    """`pruner=jsq`: `sparsity`, `pattern`, `rho` (2.1). The 1% clipping is fixed, as in the seed."""

    needs = frozenset({"jsq"})

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", rho: float = 2.1):
        super().__init__(sparsity, pattern)
        if rho < 0:
            raise ConfigError(f"pruner.rho={rho} must be >= 0")
        self.rho = rho

    def scores(self, name, W, stats):
        return jsq_scores(W, stats.jsq_norm, stats.jsq_mean, self.rho)
