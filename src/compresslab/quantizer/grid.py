"""Uniform integer grids: quantization parameters and round-to-nearest, as pure functions.

Every grid is s·(q − z) with unsigned codes q, and its range always contains 0 (so pruned zeros
stay exactly zero). Three grids, by name (`quantizer.grid`):

- ``asym``: min/max, scale (max − min)/(2^b − 1), zero round(−min/s) (GPTQ's default).
- ``sym``: GPTQ's symmetric grid, scale 2·max|w|/(2^b − 1), zero 2^(b−1): codes 0..2^b−1, so
  −max maps to code 0 exactly and +max to 0.933·max at 4 bits (the grid is not mirror-symmetric).
  One deliberate difference from GPTQ's `quant.py`: for a group with no negative weight GPTQ keeps
  min = 0, so its scale is max/(2^b − 1) around the same middle zero and everything above ~max/2
  is clipped; here such a group gets the same ±max range as any other (a group of 64+ weights
  that are all ≥ 0 does not occur in the models measured, so results match on them).
- ``absmax``: the true symmetric (AbsMax) grid of the SLiM seed's Group AbsMax and SLiM-Quant:
  scale max|w|/(2^(b−1) − 1), levels −(2^(b−1) − 1)…(2^(b−1) − 1), i.e. codes 0..2^b−2 with
  zero 2^(b−1) − 1 (one code of the 2^b unused).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

GRANULARITIES = ("row", "column", "tensor")
GRIDS = ("asym", "sym", "absmax")


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


def check_grid(grid: str, allowed: tuple[str, ...] = GRIDS, key: str = "quantizer.grid") -> None:
    if grid not in allowed:
        raise ConfigError(f"{key}={grid!r} is not a grid here; use one of {', '.join(allowed)} "
                          "(asym: min/max; sym: GPTQ's symmetric; absmax: levels ±(2^(b-1)-1), the SLiM seed's)")


def max_code(bits, grid: str):
    """Largest code of the grid: 2^b − 1, or 2^b − 2 for absmax (an int, or a tensor like `bits`)."""
    return 2**bits - (2 if grid == "absmax" else 1)


def symmetric_zero(bits, grid: str):
    """The constant zero point of a symmetric grid (not stored): 2^(b−1), or 2^(b−1) − 1 for absmax."""
    return 2 ** (bits - 1) - (1 if grid == "absmax" else 0)


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, bits, grid: str):
    """Scale and zero for ranges [wmin, wmax] (elementwise), widened to contain 0, on `grid`.

    `bits` may be an int or a tensor broadcastable to the ranges (mixed precision)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")
    wmin = torch.clamp(wmin, max=0)
    wmax = torch.clamp(wmax, min=0)
    if grid == "asym":
        empty = (wmin == 0) & (wmax == 0)
        wmin = torch.where(empty, -1.0, wmin)
        wmax = torch.where(empty, 1.0, wmax)
        span = (wmax - wmin) / (2**bits - 1)
    else:
        amax = torch.maximum(-wmin, wmax)
        amax = torch.where(amax == 0, 1.0, amax)
        span = 2 * amax / (2**bits - 1) if grid == "sym" else amax / (2 ** (bits - 1) - 1)
    # fp16-representable, as stored in the packed checkpoint (the in-memory model is the stored one)
    scale = span.half().float().clamp_min(2**-24)
    if grid == "asym":
        zero = torch.round(-wmin / scale)
    else:
        zero = torch.zeros_like(scale) + symmetric_zero(bits, grid)
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


def quantize_stat(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpQR's second level: a vector of group statistics (a scale or zero per output row, (R,)) on its
    own min/max grid of `bits`, in chunks of `group` consecutive rows.

    Returns (values (R,) float32 = low + step·code, codes (R,) uint8, step (⌈R/group⌉,), low (⌈R/group⌉,)),
    step and low fp16-representable, so the stored (codes, step, low) give back exactly these values."""
    R = v.numel()
    n = -(-R // group)
    V = torch.nn.functional.pad(v.float(), (0, n * group - R), value=float(v[-1])).view(n, group)
    low = V.amin(1).half().float()
    span = (V.amax(1) - low) / (2**bits - 1)
    step = torch.where(span > 0, span, torch.ones_like(span)).half().float().clamp_min(2**-24)
    codes = torch.clamp(torch.round((V - low[:, None]) / step[:, None]), 0, 2**bits - 1)
    vals = stat_values(codes, step, low)
    return vals.reshape(-1)[:R], codes.reshape(-1)[:R].to(torch.uint8), step, low


def stat_values(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """low + step·code per chunk of rows: codes (n, group), step and low (n,) -> (n, group) float32."""
    return low.float()[:, None] + step.float()[:, None] * codes.float()


def loo_qparams(Wg: torch.Tensor, dU: torch.Tensor, bits: int, grid: str, tau: float):
    """SpQR's outlier-aware range of one group (Wg (out, g), g ≥ 2): each weight is quantized on the
    min/max range of its row WITHOUT it (leave-one-out); where its OBS error (Δw / U_jj)² exceeds tau it
    is a likely outlier and is replaced by its row's mean of the others before the range is fit."""
    s = Wg.sort(1).values
    lmin = torch.where(Wg == s[:, :1], s[:, 1:2], s[:, :1])
    lmax = torch.where(Wg == s[:, -1:], s[:, -2:-1], s[:, -1:])
    sc, ze = qparams(lmin, lmax, bits, grid)
    err = (Wg - fake_quantize(Wg, sc, ze, max_code(bits, grid))) / dU[None, :]
    likely = err.square() > tau
    keep = (~likely).float()
    mean = (Wg * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    Wf = torch.where(likely, mean, Wg)
    return qparams(Wf.amin(1), Wf.amax(1), bits, grid)
