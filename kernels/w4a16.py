"""W4A16 group-quantized matmul: y = x · dequant(Wq)ᵀ (+ B(A x)), int4 codes unpacked in the inner loop.

Layout (compresslab's packed checkpoint, for K % 8 == 0): qweight (N, K/8) int32, eight 4-bit codes
per word, least significant nibble first; scales (N, K/g); zeros (N, K/g) (codes, as floats) or None
for a symmetric grid (zero = 8). W[n, k] = scales[n, k//g] · (code[n, k] − zeros[n, k//g]).

`w4a16_ref` is the torch reference; `w4a16_triton` the kernel. Both take an optional low-rank
epilogue (A (r, K), B (N, r)): y += (x Aᵀ) Bᵀ, fused into the kernel's output tile, so no dense
weight is ever materialized.
"""

from __future__ import annotations

import torch

from ._triton import autotune_configs, launch_operands, lowrank_epilogue, matmul_ref, triton, tl


def unpack_int4(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K/8) int32 -> (N, K) int64 codes in [0, 15]."""
    shifts = 4 * torch.arange(8, device=qweight.device)
    codes = (qweight.to(torch.int64)[:, :, None] >> shifts) & 0xF  # (N, K/8, 8)
    return codes.reshape(qweight.shape[0], -1)[:, :K]


def dequantize_w4(qweight, scales, zeros, group_size: int, K: int) -> torch.Tensor:
    codes = unpack_int4(qweight, K).float()
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, dim=1)[:, :K]
    return s * (codes - z)  # (N, K)


def w4a16_ref(x, qweight, scales, zeros, group_size: int, A=None, B=None) -> torch.Tensor:
    """Torch reference: (M, K) x -> (M, N)."""
    return matmul_ref(x, dequantize_w4(qweight, scales, zeros, group_size, x.shape[-1]), A, B)


if triton is not None:

    @triton.autotune(configs=autotune_configs(), key=["M", "N", "K"])
    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr,
                      M, N, K, G, R,
                      sxm, sxk, sqn, ssn, szn, stm, sbn, sym,
                      HAS_ZEROS: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr,
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
            code = ((word >> ((rk[None, :] % 8) * 4)) & 0xF).to(tl.float32)
            g = rk[None, :] // G
            s = tl.load(s_ptr + rn[:, None] * ssn + g, mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + rn[:, None] * szn + g, mask=wmask, other=0.0).to(tl.float32)
            else:
                z = 8.0
            w = s * (code - z)  # (BN, BK) dequantized in registers
            acc += tl.dot(x, tl.trans(w))
        if HAS_LR:  # fused low-rank epilogue: acc += T Bᵀ with T = x Aᵀ (M, R) computed beforehand
            acc = lowrank_epilogue(acc, t_ptr, b_ptr, rm, rn, M, N, R, stm, sbn, RP, BLOCK_M)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def w4a16_triton(x, qweight, scales, zeros, group_size: int, A=None, B=None) -> torch.Tensor:
    M, K = x.shape
    L = launch_operands(x, qweight.shape[0], scales, zeros, A, B)
    _w4a16_kernel[L.grid](x, qweight, scales, L.z, L.t, L.b, L.y, M, L.y.shape[1], K, group_size, L.r,
                          x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), L.z.stride(0),
                          L.t.stride(0), L.b.stride(0), L.y.stride(0),
                          HAS_ZEROS=zeros is not None, HAS_LR=A is not None, RP=L.rp)
    return L.y
