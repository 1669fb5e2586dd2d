"""2:4 sparse + int4 matmul over the packed format: only the kept half of the weights is read.

Layout (compresslab's packed checkpoint, for K % 32 == 0): qkept (N, K/16) int32 holds the codes of
the two kept weights of every group of four inputs (eight 4-bit codes per word); meta (N, K/32) int32
holds each kept weight's 2-bit position inside its group (sixteen per word). Kept entry j of row n
sits in input column (j // 2)·4 + pos[n, j]. scales/zeros are per group of `group_size` inputs.

The kernel gathers the input at those columns (the metadata drives the gather) and accumulates
Σ_j x[m, col(n, j)] · w[n, j]; an optional low-rank epilogue adds (x Aᵀ) Bᵀ.
"""

from __future__ import annotations

import torch

from ._triton import autotune_configs, launch_operands, lowrank_epilogue, matmul_ref, triton, tl
from .w4a16 import unpack_int4


def unpack_meta(meta: torch.Tensor, kept: int) -> torch.Tensor:
    """(N, K/32) int32 -> (N, K/2) positions in [0, 3]."""
    shifts = 2 * torch.arange(16, device=meta.device)
    return ((meta.to(torch.int64)[:, :, None] >> shifts) & 0x3).reshape(meta.shape[0], -1)[:, :kept]


def dequantize_24(qkept, meta, scales, zeros, group_size: int, K: int) -> torch.Tensor:
    """The dense (N, K) weight (zeros where pruned): for tests and the reference."""
    N, kept = qkept.shape[0], K // 2
    codes = unpack_int4(qkept, kept).float()
    cols = (torch.arange(kept, device=qkept.device) // 2 * 4)[None, :] + unpack_meta(meta, kept)
    g = cols // group_size
    s = scales.float().gather(1, g)
    z = 8.0 if zeros is None else zeros.float().gather(1, g)
    W = torch.zeros(N, K, device=qkept.device)
    return W.scatter_(1, cols, s * (codes - z))


def sparse24_w4_ref(x, qkept, meta, scales, zeros, group_size: int, A=None, B=None) -> torch.Tensor:
    return matmul_ref(x, dequantize_24(qkept, meta, scales, zeros, group_size, x.shape[-1]), A, B)


if triton is not None:

    @triton.autotune(configs=autotune_configs(gather=True), key=["M", "N", "K"])
    @triton.jit
    def _sparse24_kernel(x_ptr, qk_ptr, mt_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr,
                         M, N, K, G, R,
                         sxm, sxk, sqn, smn, ssn, szn, stm, sbn, sym,
                         HAS_ZEROS: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        KEPT = K // 2
        for j0 in range(0, KEPT, BLOCK_K):  # BLOCK_K kept entries = 2·BLOCK_K input columns
            rj = j0 + tl.arange(0, BLOCK_K)
            nmask = (rn[:, None] < N) & (rj[None, :] < KEPT)
            word = tl.load(qk_ptr + rn[:, None] * sqn + rj[None, :] // 8, mask=nmask, other=0)
            code = ((word >> ((rj[None, :] % 8) * 4)) & 0xF).to(tl.float32)  # (BN, BK)
            mword = tl.load(mt_ptr + rn[:, None] * smn + rj[None, :] // 16, mask=nmask, other=0)
            col = (rj[None, :] // 2) * 4 + ((mword >> ((rj[None, :] % 16) * 2)) & 0x3)  # (BN, BK)
            g = col // G
            s = tl.load(s_ptr + rn[:, None] * ssn + g, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + rn[:, None] * szn + g, mask=nmask, other=0.0).to(tl.float32)
            else:
                z = 8.0
            w = s * (code - z)
            xg = tl.load(x_ptr + rm[:, None, None] * sxm + col[None, :, :] * sxk,
                         mask=(rm[:, None, None] < M) & nmask[None, :, :], other=0.0).to(tl.float32)
            acc += tl.sum(xg * w[None, :, :], axis=2)  # (BM, BN)
        if HAS_LR:
            acc = lowrank_epilogue(acc, t_ptr, b_ptr, rm, rn, M, N, R, stm, sbn, RP, BLOCK_M)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def sparse24_w4_triton(x, qkept, meta, scales, zeros, group_size: int, A=None, B=None) -> torch.Tensor:
    M, K = x.shape
    if K % 32:
        raise ValueError(f"the 2:4 kernel needs K divisible by 32, got {K}")
    L = launch_operands(x, qkept.shape[0], scales, zeros, A, B)
    _sparse24_kernel[L.grid](x, qkept, meta, scales, L.z, L.t, L.b, L.y, M, L.y.shape[1], K, group_size, L.r,
                             x.stride(0), x.stride(1), qkept.stride(0), meta.stride(0), scales.stride(0),
                             L.z.stride(0), L.t.stride(0), L.b.stride(0), L.y.stride(0),
                             HAS_ZEROS=zeros is not None, HAS_LR=A is not None, RP=L.rp)
    return L.y
