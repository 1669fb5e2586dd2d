"""`lowrank=eora`: EoRA (Liu et al., "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation", 2024). XXᵀ = QΛQᵀ; SVD of E·Q√Λ; map back by (Q√Λ)⁻¹ = Λ^{-1/2}Qᵀ."""

import torch

from .base import LowRank


class EoRA(LowRank):
    needs = frozenset({"hessian"})

    def transform(self, W, E, stats):
        H = stats.hessian.double()  # ∝ XXᵀ (in, in); the scale cancels
        lam, Q = torch.linalg.eigh(H)
        lam = lam.clamp_min(lam.max() * 1e-8)
        T = Q * lam.sqrt()[None, :]
        T_inv = (Q / lam.sqrt()[None, :]).T
        return T.float(), T_inv.float()
