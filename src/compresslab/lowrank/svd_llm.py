"""`lowrank=svd_llm`: SVD-LLM's truncation-aware whitening (Wang et al., "SVD-LLM: Truncation-aware
Singular Value Decomposition for LLM Compression", ICLR 2025), applied to the compression error:
S is the Cholesky factor of XXᵀ (XXᵀ = SSᵀ), SVD of E·S, map back by S⁻¹."""

import torch

from .base import LowRank


class SVDLLM(LowRank):
    needs = frozenset({"hessian"})

    def transform(self, W, E, stats):
        H = stats.hessian.double()
        H = H + 1e-6 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        S = torch.linalg.cholesky(H)  # lower: H = S Sᵀ
        S_inv = torch.linalg.solve_triangular(S, torch.eye(H.shape[0], dtype=H.dtype, device=H.device), upper=False)
        return S.float(), S_inv.float()
