"""`lowrank=svd_llm`: SVD-LLM's truncation-aware whitening (Wang et al., "SVD-LLM: Truncation-aware
Singular Value Decomposition for LLM Compression", ICLR 2025), applied to the compression error:
S is the Cholesky factor of XXᵀ (XXᵀ = SSᵀ), SVD of E·S, map back by S⁻¹."""

import logging

import torch

from .base import LowRank

log = logging.getLogger(__name__)


class SVDLLM(LowRank):
    needs = frozenset({"hessian"})

    def transform(self, W, E, stats):
        H = stats.hessian.double()
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        mean_diag = H.diagonal().mean().clamp_min(1e-12)
        # XXᵀ is singular when there are fewer calibration tokens than channels (or dead channels):
        # grow the damping ×10 until the factorization succeeds, as SVD-LLM's code does on failure.
        for damp in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
            S, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)  # lower: H = S Sᵀ
            if info == 0:
                break
        else:
            raise RuntimeError(f"{self.__class__.__name__}: XXᵀ is not positive definite even with damping 1.0")
        if damp > 1e-6:
            log.warning("svd_llm: Cholesky of XXᵀ needed damping %g·mean(diag)", damp)
        S_inv = torch.linalg.solve_triangular(S, eye, upper=False)
        return S.float(), S_inv.float()
