"""Triton import guard, autotune configs per GPU generation, and the dispatch log line."""

from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple

import torch

log = logging.getLogger("compresslab.kernels")

try:  # Triton is optional: without it every op runs its torch reference
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = tl = None


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(gather: bool = False):
    """Tile configs: small-M (GEMV/small batch) friendly, per generation; one config when interpreting.
    `gather`: the 2:4 kernel reduces a (BLOCK_M, BLOCK_N, BLOCK_K) gathered tile in registers, so its
    tiles stay small."""
    if triton is None:
        return []
    if interpret() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    major = torch.cuda.get_device_capability()[0]
    if gather:
        shapes = [(1, 64, 64, 4, 3), (1, 128, 32, 4, 3), (4, 64, 32, 4, 3), (16, 32, 32, 4, 2), (16, 64, 16, 4, 2)]
        if major >= 9:
            shapes += [(1, 128, 64, 8, 4), (4, 128, 32, 8, 3)]
    elif major >= 9:  # Hopper: wider N tiles, deeper pipelines
        shapes = [(16, 128, 128, 4, 4), (16, 256, 64, 8, 4), (32, 128, 128, 4, 5), (64, 128, 64, 4, 4),
                  (64, 256, 64, 8, 3)]
    else:  # Ampere (sm_80/86) and older
        shapes = [(16, 64, 128, 4, 3), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                  (64, 128, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def matmul_ref(x: torch.Tensor, W: torch.Tensor, A=None, B=None) -> torch.Tensor:
    """x Wᵀ (+ (x Aᵀ) Bᵀ) in fp32, returned in x's dtype: the tail of every torch reference."""
    y = x.float() @ W.T
    if A is not None:
        y = y + (x.float() @ A.float().T) @ B.float().T
    return y.to(x.dtype)


class Launch(NamedTuple):
    """What both int4 kernels' launches share: the output, the zeros operand, the low-rank
    epilogue's operands and the grid."""

    y: torch.Tensor  # (M, N) output
    z: torch.Tensor  # zeros, or the scales as a never-read stand-in when symmetric
    t: torch.Tensor  # T = x Aᵀ (M, r), or x as a stand-in when there is no low-rank path
    b: torch.Tensor  # B (N, r), or x
    r: int  # rank (0: no low-rank path)
    rp: int  # rank padded to a power of two >= 16
    grid: Callable


def launch_operands(x: torch.Tensor, N: int, scales, zeros, A, B) -> Launch:
    if triton is None:
        raise RuntimeError("triton is not installed")
    M = x.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = zeros if zeros is not None else scales
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    if A is None:
        return Launch(y, z, x, x, 0, 16, grid)
    t = (x @ A.to(x.dtype).T).contiguous()  # the small half of the low-rank path
    return Launch(y, z, t, B.contiguous(), t.shape[1], max(16, triton.next_power_of_2(t.shape[1])), grid)


if triton is not None:

    @triton.jit
    def lowrank_epilogue(acc, t_ptr, b_ptr, rm, rn, M, N, R, stm, sbn, RP: tl.constexpr, BLOCK_M: tl.constexpr):
        """acc (BM, BN) += T[rm, :R] · B[rn, :R]ᵀ: the low-rank path, fused into the output tile
        (tl.dot needs 16 rows; GEMV tiles reduce in registers)."""
        rr = tl.arange(0, RP)
        t = tl.load(t_ptr + rm[:, None] * stm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                    other=0.0).to(tl.float32)
        if BLOCK_M >= 16:
            return acc + tl.dot(t, tl.trans(b))
        return acc + tl.sum(t[:, None, :] * b[None, :, :], axis=2)

else:  # pragma: no cover
    lowrank_epilogue = None


_warned: set[str] = set()


def use_triton(x: torch.Tensor, op: str) -> bool:
    """Triton on a CUDA tensor (or under TRITON_INTERPRET=1); otherwise log once and use the reference."""
    if triton is not None and (x.is_cuda or interpret()):
        return True
    if op not in _warned:
        _warned.add(op)
        why = "Triton is not installed" if triton is None else "no GPU (set TRITON_INTERPRET=1 to run it on the CPU)"
        log.info("%s: %s; using the torch reference", op, why)
    return False
