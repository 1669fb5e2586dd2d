"""SLiM-Quant: pick the clipping threshold α·max|W| that minimizes the expected quantization error
(Mozaffari et al., "SLiM: One-shot Quantization and Sparsity with Low-rank Approximation for LLM
Weight Compression", ICML 2025).

Per tensor, the expectation is taken under the weights' histogram: for each bin centre x with
probability p(x), the error is (x − Q_α(x))², which covers both the rounding error inside the
range and the clipping error outside it. Per group, the exact mean squared error over the group's
weights is used. The search is a coarse grid of 11 values of α, then 11 around the best.
"""

from __future__ import annotations

import torch

from . import grid
from .base import WeightQuantizer
from .format import QuantizedWeight

COARSE = torch.linspace(0.1, 1.0, 11)


def _grid_err(x: torch.Tensor, weight: torch.Tensor | None, c: torch.Tensor, bits: int,
              grid_: str = "absmax") -> torch.Tensor:
    """Expected squared error of quantizing values x (..., k) on the symmetric grid clipped at c (...)."""
    scale, zero = grid.qparams(-c, c, bits, grid_)
    err = (x - grid.fake_quantize(x, scale[..., None], zero[..., None], grid.max_code(bits, grid_))).square()
    return (err * weight).sum(-1) if weight is not None else err.mean(-1)


def search_alpha_hist(w: torch.Tensor, bits: int, bins: int = 2048, fine: int = 11, grid_: str = "absmax") -> float:
    """α minimizing the histogram-expected error of one tensor (values w, any shape)."""
    w = w.float().flatten()
    wmax = w.abs().max().clamp_min(1e-12)
    hist = torch.histc(w, bins=bins, min=-wmax.item(), max=wmax.item())
    p = hist / hist.sum()
    edges = torch.linspace(-wmax.item(), wmax.item(), bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2

    def best(alphas):
        errs = torch.stack([_grid_err(centres, p, a * wmax, bits, grid_) for a in alphas])
        i = int(errs.argmin())
        return float(alphas[i]), i

    a0, _ = best(COARSE)
    step = float(COARSE[1] - COARSE[0])
    a, _ = best(torch.linspace(max(a0 - step, 1e-3), min(a0 + step, 1.0), fine))
    return a


def search_alpha_groups(view: torch.Tensor, bits: int, fine: int = 11, grid_: str = "absmax") -> torch.Tensor:
    """Per-group α (R, C) minimizing the exact MSE over each group's weights, view (R, C, k)."""
    wmax = view.abs().amax(-1).clamp_min(1e-12)  # (R, C)

    def errs(alphas):  # (A, R, C)
        return torch.stack([_grid_err(view, None, a * wmax, bits, grid_) for a in alphas])

    e = errs(COARSE)
    a0 = COARSE[e.argmin(0)]  # (R, C)
    step = float(COARSE[1] - COARSE[0])
    offs = torch.linspace(-step, step, fine)
    cand = (a0[None] + offs[:, None, None]).clamp(1e-3, 1.0)  # (F, R, C)
    e = torch.stack([_grid_err(view, None, cand[f] * wmax, bits, grid_) for f in range(fine)])
    return cand.gather(0, e.argmin(0)[None])[0]


def slim_quantize(W: torch.Tensor, bits: int, group_size: int = -1,
                  grid_: str = "absmax") -> tuple[torch.Tensor, QuantizedWeight, torch.Tensor]:
    """Symmetric quantization of W (out, in) with searched clipping; per tensor when group_size=-1.
    The seed's grid is AbsMax (levels ±(2^(b−1)−1)·α·max|W|/(2^(b−1)−1)); `grid_="sym"` uses GPTQ's.

    Returns (W_hat, QuantizedWeight, α) with α a scalar tensor or (out, in/g)."""
    W = W.float()
    out, inp = W.shape
    if group_size > 0:
        view = W.reshape(out, inp // group_size, group_size)
        alpha = search_alpha_groups(view, bits, grid_=grid_)
        c = alpha * view.abs().amax(-1)
        g = group_size
    else:
        nz = W[W != 0]
        alpha = torch.tensor(search_alpha_hist(nz if nz.numel() else W, bits, grid_=grid_))
        c = (alpha * W.abs().max()).reshape(1, 1)
        g = inp
    scale, zero = grid.qparams(-c, c, bits, grid_)
    qw = QuantizedWeight(None, scale, zero, bits, g, grid_, (out, inp)).encode(W)
    return qw.dequantize(), qw, alpha


class SLiMQuant(WeightQuantizer):
    """`quantizer=slim_quant`: `bits`, `group_size` (-1 = one α per tensor), `grid` (absmax, the
    seed's; or sym). It clips ±α·max|W|, so the grid is symmetric."""

    grids = ("absmax", "sym")

    def __init__(self, bits: int = 4, group_size: int = -1, grid: str = "absmax", act_bits: int | None = None,
                 act_granularity: str | None = None, act_group_size: int = 64):
        super().__init__(bits, group_size, grid, act_bits, act_granularity, act_group_size)

    def quantize(self, name, W, stats=None):
        W_hat, qw, _ = slim_quantize(W, self.bits, self.group_size, self.grid)
        return W_hat, qw

    def __repr__(self):
        return f"SLiMQuant({self._tag()})"
