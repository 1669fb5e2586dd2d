"""`lowrank=eora`: EoRA (Liu et al., "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation", 2024). XXᵀ = QΛQᵀ; SVD of E·Q√Λ; map back by (Q√Λ)⁻¹ = Λ^{-1/2}Qᵀ."""

import torch

from .base import LowRank


EIG_FLOOR = 1e-8  # eigenvalues of XXᵀ below this × the largest are raised to it (an invertible T)


def eigen_whitening(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T⁻¹) = (Q√Λ, Λ^{-1/2}Qᵀ) from H ∝ XXᵀ = QΛQᵀ (in, in), in float32: ‖E·T‖_F = ‖EX‖_F up to
    the scale, so truncating the SVD of E·T is optimal for the output error."""
    lam, Q = torch.linalg.eigh(H.double())
    lam = lam.clamp_min(lam.max() * EIG_FLOOR)
    return (Q * lam.sqrt()[None, :]).float(), (Q / lam.sqrt()[None, :]).T.float()


class EoRA(LowRank):
    needs = frozenset({"hessian"})

    def transform(self, W, E, stats):
        return eigen_whitening(stats.hessian)  # ∝ XXᵀ; the scale cancels
