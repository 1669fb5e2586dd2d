"""`lowrank=asvd`: ASVD (Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models", 2023): S = diag(mean |x|)^α before the SVD, α searched on a
grid by the output error ‖(E − BA)X‖ (through H)."""

import torch

from .base import LowRank, whitened_svd


class ASVD(LowRank):
    needs = frozenset({"act_absmean", "hessian"})

    def __init__(self, *args, alphas=(0.1, 0.25, 0.5, 0.75, 1.0), **kwargs):
        super().__init__(*args, **kwargs)
        self.alphas = tuple(alphas)

    def factor(self, W, E, stats, r, numerics=None, name=""):
        H = stats.hessian
        a = stats.act_absmean.float().clamp_min(1e-8)
        best = None
        for alpha in self.alphas:
            B, A = whitened_svd(E, r, a.pow(alpha))
            D = E - B @ A
            err = float(((D @ H) * D).sum())
            if best is None or err < best[0]:
                best = (err, B, A)
        return best[1], best[2]
