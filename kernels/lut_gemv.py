"""LUT matmul for non-uniform 4-bit codes (SqueezeLLM): y = x · Ŵᵀ (+ B(A x)) (+ sparse outliers),
Ŵ[n, k] = lut[n, code[n, k]], the table entry gathered in the inner loop (no dense weight materialized).

Layout (compresslab's packed checkpoint, K % 8 == 0): qweight (N, K/8) int32, eight 4-bit codes per
word, least significant nibble first (as w4a16); lut (N, 16) fp16, one table per output row.
Outliers (dense-and-sparse) are added by the caller as a sparse correction (`add_sparse`).

`lut4_ref` is the torch reference; `lut4_triton` the kernel (decode-sized M: the GEMV of token
generation, tiles of up to 16 rows).
"""

from __future__ import annotations

import torch

from ._triton import autotune_configs, launch_operands, lowrank_epilogue, matmul_ref, triton, tl
from .w4a16 import unpack_int4


def dequantize_lut4(qweight: torch.Tensor, lut: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K/8) int32 codes + (N, 16) tables -> (N, K) float32."""
    return lut.float().gather(1, unpack_int4(qweight, K))


def lut4_ref(x, qweight, lut, A=None, B=None) -> torch.Tensor:
    """Torch reference: (M, K) x -> (M, N)."""
    return matmul_ref(x, dequantize_lut4(qweight, lut, x.shape[-1]), A, B)


def add_sparse(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """y (M, N) += x (M, K) · Sᵀ for the sparse S with S[rows, cols] = vals (nnz,): the outliers' part."""
    if rows.numel() == 0:
        return y
    contrib = x[:, cols].float() * vals.float()[None, :]  # (M, nnz)
    return y.index_add_(1, rows, contrib.to(y.dtype))


if triton is not None:

    @triton.autotune(configs=autotune_configs(), key=["M", "N", "K"])
    @triton.jit
    def _lut4_kernel(x_ptr, qw_ptr, lut_ptr, t_ptr, b_ptr, y_ptr,
                     M, N, K, R,
                     sxm, sxk, sqn, sln, stm, sbn, sym,
                     HAS_LR: tl.constexpr, RP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)  # (BM, BK)
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            word = tl.load(qw_ptr + rn[:, None] * sqn + (rk[None, :] // 8), mask=wmask, other=0)  # (BN, BK)
            code = (word >> ((rk[None, :] % 8) * 4)) & 0xF
            w = tl.load(lut_ptr + rn[:, None] * sln + code, mask=wmask, other=0.0).to(tl.float32)  # gathered
            acc += tl.dot(x, tl.trans(w))
        if HAS_LR:
            acc = lowrank_epilogue(acc, t_ptr, b_ptr, rm, rn, M, N, R, stm, sbn, RP, BLOCK_M)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def lut4_triton(x, qweight, lut, A=None, B=None) -> torch.Tensor:
    M, K = x.shape
    L = launch_operands(x, qweight.shape[0], lut, None, A, B)
    _lut4_kernel[L.grid](x, qweight, lut, L.t, L.b, L.y, M, L.y.shape[1], K, L.r,
                         x.stride(0), x.stride(1), qweight.stride(0), lut.stride(0), L.t.stride(0),
                         L.b.stride(0), L.y.stride(0), HAS_LR=A is not None, RP=L.rp)
    return L.y
