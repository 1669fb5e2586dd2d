"""Triton kernels and their torch references (importable as ``compresslab.kernels``).

    w4a16_matmul(x, qweight, scales, zeros, group_size, A=None, B=None)      int4 group-quantized
    sparse24_w4_matmul(x, qkept, meta, scales, zeros, group_size, A=None, B=None)   2:4 + int4
    lut4_matmul(x, qweight, lut, A=None, B=None)                              4-bit codes into per-row tables

Each dispatches to Triton on a GPU (or with TRITON_INTERPRET=1) and to its torch reference otherwise,
logging once which one it uses. The optional (A, B) adds the low-rank path y += (x Aᵀ) Bᵀ.
"""

from ._triton import use_triton
from .lut_gemv import add_sparse, lut4_ref, lut4_triton
from .sparse24_w4 import sparse24_w4_ref, sparse24_w4_triton
from .w4a16 import w4a16_ref, w4a16_triton


def w4a16_matmul(x, qweight, scales, zeros, group_size, A=None, B=None):
    fn = w4a16_triton if use_triton(x, "w4a16") else w4a16_ref
    return fn(x, qweight, scales, zeros, group_size, A, B)


def sparse24_w4_matmul(x, qkept, meta, scales, zeros, group_size, A=None, B=None):
    fn = sparse24_w4_triton if use_triton(x, "sparse24_w4") else sparse24_w4_ref
    return fn(x, qkept, meta, scales, zeros, group_size, A, B)


def lut4_matmul(x, qweight, lut, A=None, B=None):
    fn = lut4_triton if use_triton(x, "lut4") else lut4_ref
    return fn(x, qweight, lut, A, B)


__all__ = ["add_sparse", "lut4_matmul", "lut4_ref", "lut4_triton", "sparse24_w4_matmul", "sparse24_w4_ref", "sparse24_w4_triton", "w4a16_matmul", "w4a16_ref",
           "w4a16_triton"]
