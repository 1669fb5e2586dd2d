"""The GPTQ column sweep inside one lazy-update block, fused into one Triton launch.

The torch path (`compresslab.obs.obs_compress`) runs each column as a handful of small ops; on a GPU
that is a launch-latency-bound loop of ~10 launches per column. Here one program owns `BLOCK_R`
output rows and the block's `b` columns in registers and walks the columns in order: group range
(min/max grid, at a group's first column, when the ranges are dynamic), round-to-nearest-even, the
error (w − q)/U_ii, and its rank-1 push onto the block's later columns. The block's errors come back
for the lazy GEMM onto the columns after the block (done by the caller, as on the CPU).

Layout (transposed, so a column is a contiguous row): Wt (b, out) fp32, updated in place to the
quantized values; Et (b, out) the errors; U1 (b, b) the block of the upper Cholesky factor of H⁻¹;
scales/zeros (groups, out) fp32 (written for dynamic ranges, read for static ones); maxq (groups,)
the largest code of each group; keep (b, out) uint8 or None (a fixed pruning mask to hold).

`gptq_block_ref` is the plain torch reference (one level of rank-1 updates, as in GPTQ's Alg. 1).
"""

from __future__ import annotations

import math

import torch

from ..quantizer.grid import qparams
from ._triton import tl, triton

GRIDS = {"asym": 0, "sym": 1, "absmax": 2}


def _bits_of(maxq: float, grid: str) -> int:
    """The bit width whose largest code is `maxq` (the kernel is given codes, the grid bit widths)."""
    return round(math.log2(maxq + (2 if grid == "absmax" else 1)))


def gptq_block_ref(Wt, U1, scales, zeros, maxq, group_size: int, col0: int, grid: str, dynamic: bool, keep=None):
    """Torch reference of the fused block: returns Et; updates Wt (and, when dynamic, scales/zeros)."""
    b = Wt.shape[0]
    Et = torch.zeros_like(Wt)
    for i in range(b):
        col = col0 + i
        gi = col // group_size
        if dynamic and col % group_size == 0:
            Wg = Wt[i:i + group_size] * keep[i:i + group_size] if keep is not None else Wt[i:i + group_size]
            scales[gi], zeros[gi] = qparams(Wg.amin(0), Wg.amax(0), _bits_of(float(maxq[gi]), grid), grid)
        s, z = scales[gi], zeros[gi]
        w = Wt[i] * keep[i] if keep is not None else Wt[i]
        q = (torch.clamp(torch.round(w / s) + z, 0, float(maxq[gi])) - z) * s
        if keep is not None:
            q = q * keep[i]
        err = (Wt[i] - q) / U1[i, i]
        Wt[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
        Wt[i] = q
        Et[i] = err
    return Et


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _gptq_block_kernel(wt_ptr, et_ptr, u_ptr, s_ptr, z_ptr, mq_ptr, k_ptr,
                           B, OUT, G, COL0,
                           GRID: tl.constexpr, DYNAMIC: tl.constexpr, HAS_KEEP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_B)
        rmask = rows < OUT
        cmask = cols < B
        tmask = rmask[:, None] & cmask[None, :]
        offs = cols[None, :] * OUT + rows[:, None]  # T[r, c] = Wt[c, r]
        T = tl.load(wt_ptr + offs, mask=tmask, other=0.0)
        if HAS_KEEP:
            Kf = tl.load(k_ptr + offs, mask=tmask, other=0).to(tl.float32)
        else:
            Kf = tl.full((BLOCK_R, BLOCK_B), 1.0, tl.float32)
        s_cur = tl.full((BLOCK_R,), 1.0, tl.float32)
        z_cur = tl.zeros((BLOCK_R,), tl.float32)
        for i in range(0, B):
            col = COL0 + i
            gi = col // G
            maxq = tl.load(mq_ptr + gi)
            sel = (cols == i)[None, :]
            if DYNAMIC:
                if col % G == 0:
                    gm = ((cols >= i) & (cols < i + G) & cmask)[None, :]
                    Wg = T * Kf
                    wmin = tl.minimum(tl.min(tl.where(gm, Wg, float("inf")), axis=1), 0.0)
                    wmax = tl.maximum(tl.max(tl.where(gm, Wg, float("-inf")), axis=1), 0.0)
                    if GRID == 0:
                        empty = (wmin == 0.0) & (wmax == 0.0)
                        wmin = tl.where(empty, -1.0, wmin)
                        wmax = tl.where(empty, 1.0, wmax)
                        span = (wmax - wmin) / maxq
                    else:
                        amax = tl.maximum(-wmin, wmax)
                        amax = tl.where(amax == 0.0, 1.0, amax)
                        if GRID == 1:
                            span = 2.0 * amax / maxq
                        else:
                            span = amax / (maxq / 2.0)
                    s_cur = tl.maximum(span.to(tl.float16).to(tl.float32), 2.0**-24)
                    if GRID == 0:
                        z_cur = _round_half_even(-wmin / s_cur)
                    elif GRID == 1:
                        z_cur = tl.zeros((BLOCK_R,), tl.float32) + (maxq + 1.0) / 2.0
                    else:
                        z_cur = tl.zeros((BLOCK_R,), tl.float32) + maxq / 2.0
                    tl.store(s_ptr + gi * OUT + rows, s_cur, mask=rmask)
                    tl.store(z_ptr + gi * OUT + rows, z_cur, mask=rmask)
            else:
                s_cur = tl.load(s_ptr + gi * OUT + rows, mask=rmask, other=1.0)
                z_cur = tl.load(z_ptr + gi * OUT + rows, mask=rmask, other=0.0)
            wraw = tl.sum(tl.where(sel, T, 0.0), axis=1)  # (BLOCK_R,) column i
            kcol = tl.sum(tl.where(sel, Kf, 0.0), axis=1)
            w = wraw * kcol
            qi = tl.minimum(tl.maximum(_round_half_even(w / s_cur) + z_cur, 0.0), maxq)
            q = (qi - z_cur) * s_cur * kcol
            d = tl.load(u_ptr + i * B + i)
            err = (wraw - q) / d
            tl.store(et_ptr + i * OUT + rows, err, mask=rmask)
            u = tl.load(u_ptr + i * B + cols, mask=cmask & (cols > i), other=0.0)  # U[i, later columns]
            T = T - err[:, None] * u[None, :]
            T = tl.where(sel, q[:, None], T)
        tl.store(wt_ptr + offs, T, mask=tmask)


def gptq_block_triton(Wt, U1, scales, zeros, maxq, group_size: int, col0: int, grid: str, dynamic: bool,
                      keep=None, block_r: int = 32):
    """The fused block sweep (see the module docstring); same contract as `gptq_block_ref`."""
    b, out = Wt.shape
    Et = torch.empty_like(Wt)
    k = keep.to(torch.uint8).contiguous() if keep is not None else Wt  # never read without HAS_KEEP
    grid_fn = (triton.cdiv(out, block_r),)
    _gptq_block_kernel[grid_fn](Wt, Et, U1.contiguous(), scales, zeros, maxq.float().contiguous(), k,
                                b, out, group_size, col0, GRID=GRIDS[grid], DYNAMIC=dynamic,
                                HAS_KEEP=keep is not None, BLOCK_R=block_r,
                                BLOCK_B=max(16, triton.next_power_of_2(b)))
    return Et
