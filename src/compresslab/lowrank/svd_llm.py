"""`lowrank=svd_llm`: SVD-LLM's truncation-aware whitening (Wang et al., "SVD-LLM: Truncation-aware
Singular Value Decomposition for LLM Compression", ICLR 2025), applied to the compression error:
S is the Cholesky factor of XXᵀ (XXᵀ = SSᵀ), SVD of E·S, map back by S⁻¹."""

import logging

import torch

from ..obs import Numerics
from .base import LowRank, whitened_svd

log = logging.getLogger(__name__)
DAMPS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # × mean(diag XXᵀ)


def whitening(H: torch.Tensor, numerics: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S the lower Cholesky factor of H + λ·mean(diag H)·I. XXᵀ is singular when there
    are fewer calibration tokens than channels (or dead channels): λ grows ×10 from 1e-6 until the
    factorization succeeds, as SVD-LLM's code does on failure; the λ used goes to `numerics`."""
    H = H.double()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    for i, damp in enumerate(DAMPS):
        S, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)  # lower: H = S Sᵀ
        if info == 0:
            break
    else:
        raise RuntimeError("svd_llm: XXᵀ is not positive definite even with damping 1.0")
    if i:
        log.warning("svd_llm: Cholesky of XXᵀ needed damping %g·mean(diag)", damp)
    if numerics is not None:
        numerics.append(Numerics(damp, False, i))
    S_inv = torch.linalg.solve_triangular(S, eye, upper=False)
    return S.float(), S_inv.float()


class SVDLLM(LowRank):
    needs = frozenset({"hessian"})

    def transform(self, W, E, stats):
        return whitening(stats.hessian)

    def factor(self, W, E, stats, r, numerics=None, name=""):
        return whitened_svd(E, r, *whitening(stats.hessian, numerics))
