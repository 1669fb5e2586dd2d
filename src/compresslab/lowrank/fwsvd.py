"""`lowrank=fwsvd`: Fisher-weighted SVD (Hsu et al., "Language Model Compression with Weighted Low-Rank
Factorization", ICLR 2022).

Each output row i of E (out, in) is weighted by its Fisher importance I_i = Σ_j F_ij (the diagonal
Fisher of W, fisher.py, summed over the row): the rank-r factors minimise ‖diag(√I)(E − BA)‖_F, which is
Eckart–Young on the row-scaled matrix, SVD(diag(√I)·E) = UΣVᵀ, B = diag(√I)⁻¹U_r, A = Σ_rV_rᵀ.
As compensation E = W − C(W); as a replacement (nothing before it, `param_ratio`) E = W.
"""

from __future__ import annotations

import torch

from .base import LowRank

MIN_IMPORTANCE = 1e-12  # × the mean: rows no gradient reached keep a tiny, finite weight


def row_weighted_svd(E: torch.Tensor, r: int, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) minimising ‖diag(√importance)·(E − BA)‖_F (importance: (out,) ≥ 0)."""
    imp = importance.double()
    d = imp.clamp_min(float(imp.mean().clamp_min(1e-30)) * MIN_IMPORTANCE).sqrt()  # (out,)
    U, S, Vh = torch.linalg.svd(d[:, None] * E.double(), full_matrices=False)
    B = U[:, :r] / d[:, None]
    A = S[:r, None] * Vh[:r]
    return B.float().contiguous(), A.float().contiguous()


class FWSVD(LowRank):
    needs = frozenset({"fisher"})

    def factor(self, W, E, stats, r, numerics=None, name=""):
        F = stats.fisher_of(name).to(E.device)  # (out, in)
        return row_weighted_svd(E, r, F.sum(1))
