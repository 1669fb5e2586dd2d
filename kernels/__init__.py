"""Triton kernels and their torch references (importable as ``compresslab.kernels``).

    w4a16_matmul(x, qweight, scales, zeros, group_size, A=None, B=None)      int4 group-quantized
    sparse24_w4_matmul(x, qkept, meta, scales, zeros, group_size, A=None, B=None)   2:4 + int4

Each dispatches to Triton on a GPU (or with TRITON_INTERPRET=1) and to its torch reference otherwise,
logging once which one it uses. The optional (A, B) adds the low-rank path y += (x Aᵀ) Bᵀ.
"""

from ._triton import use_triton
from .sparse24_w4 import sparse24_w4_ref, sparse24_w4_triton
from .w4a16 import w4a16_ref, w4a16_triton


def w4a16_matmul(x, qweight, scales, zeros, group_size, A=None, B=None):
    fn = w4a16_triton if use_triton(x, "w4a16") else w4a16_ref
    return fn(x, qweight, scales, zeros, group_size, A, B)


def sparse24_w4_matmul(x, qkept, meta, scales, zeros, group_size, A=None, B=None):
    fn = sparse24_w4_triton if use_triton(x, "sparse24_w4") else sparse24_w4_ref
    return fn(x, qkept, meta, scales, zeros, group_size, A, B)


__all__ = ["sparse24_w4_matmul", "sparse24_w4_ref", "sparse24_w4_triton", "w4a16_matmul", "w4a16_ref",
           "w4a16_triton"]
