"""Uniform integer grids: min/max quantization parameters and round-to-nearest, as pure functions.

Conventions follow GPTQ's quantizer: the range always contains 0 (so pruned zeros stay exactly
zero), asymmetric zeros are round(−min/scale), symmetric ones are (maxq+1)/2.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

GRANULARITIES = ("row", "column", "tensor")


def check_bits(bits: int, lo: int = 2, hi: int = 8) -> None:
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"quantizer.bits={bits!r} is out of range; use an integer from {lo} to {hi}")


def check_group_size(name: str, in_features: int, group_size: int) -> None:
    if group_size == -1:
        return
    if group_size < 1 or in_features % group_size:
        valid = [g for g in range(8, in_features + 1) if in_features % g == 0]
        raise ConfigError(
            f"quantizer.group_size={group_size} does not divide the input width {in_features} of {name}; "
            f"valid group sizes for this layer: {valid} or -1 (per output channel)"
        )


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero for ranges [wmin, wmax] (elementwise), widened to contain 0.

    `bits` may be an int or a tensor broadcastable to the ranges (mixed precision)."""
    maxq = 2**bits - 1
    wmin = torch.clamp(wmin, max=0)
    wmax = torch.clamp(wmax, min=0)
    if symmetric:
        wmax = torch.maximum(-wmin, wmax)
        wmin = torch.where(wmin < 0, -wmax, wmin)
    empty = (wmin == 0) & (wmax == 0)
    wmin = torch.where(empty, -1.0, wmin)
    wmax = torch.where(empty, 1.0, wmax)
    # fp16-representable, as stored in the packed checkpoint (the in-memory model is the stored one)
    scale = ((wmax - wmin) / maxq).half().float().clamp_min(2**-24)
    if symmetric:
        zero = torch.zeros_like(scale) + (maxq + 1) / 2
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of w on the grid s·(q − z)."""
    q = torch.round(w / scale) + zero
    if isinstance(maxq, torch.Tensor):
        return torch.minimum(q.clamp_min(0), maxq)
    return torch.clamp(q, 0, maxq)


def fake_quantize(w, scale, zero, maxq):
    return scale * (quantize(w, scale, zero, maxq) - zero)


def group_reshape(W: torch.Tensor, group_size: int, granularity: str):
    """(R, C, k) view of W (out, in) whose last dim holds the elements sharing one (scale, zero).

    Returns (view, effective group size along the input dim)."""
    out, inp = W.shape
    if group_size > 0:
        return W.reshape(out, inp // group_size, group_size), group_size
    if granularity == "row":
        return W.reshape(out, 1, inp), inp
    if granularity == "column":
        return W.T.reshape(1, inp, out), 1
    if granularity == "tensor":
        return W.reshape(1, 1, -1), inp
    raise ConfigError(f"unknown quantizer.granularity={granularity!r}; use one of {', '.join(GRANULARITIES)}")
