"""AWQ-style activation-aware scaling (Lin et al., "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024).

Per input channel, s = mean|x|^α (normalized by √(max s · min s)); W·diag(s) is rounded and the
layer computes Q(W·diag(s))·(x / s). α is searched on a grid by the layer's output error on the
calibration inputs, computed exactly through the Hessian: ‖(W − Ŵ)X‖² ∝ tr((W−Ŵ) H (W−Ŵ)ᵀ).
The scale is kept as an explicit per-input-channel scale (16 bits each, counted in avg_bits),
equivalent to folding it into the preceding norm or Linear.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..stages import layer_state
from .base import WeightQuantizer
from .rtn import rtn_quantize


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(Δ H Δᵀ) with Δ = W − Ŵ: the summed squared output error (up to the 2/n of H)."""
    D = (W - W_hat).float()
    return ((D @ H) * D).sum()


def awq_quantize(W: torch.Tensor, H: torch.Tensor, act_absmean: torch.Tensor, bits: int, group_size: int,
                 grid: str = "asym", grid_points: int = 20):
    """Returns (W_hat, QuantizedWeight of W·diag(s), s, best α)."""
    W = W.float()
    a = act_absmean.float().clamp_min(1e-8)
    best = None
    for alpha in torch.arange(grid_points).float() / grid_points:  # 0, 1/n, ..., (n-1)/n
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        qw = rtn_quantize(W * s[None], bits, group_size, grid)
        W_hat = qw.dequantize() / s[None]
        err = float(output_error(W, W_hat, H))
        if best is None or err < best[0]:
            best = (err, W_hat, qw, s, float(alpha))
    return best[1], best[2], best[3], best[4]


class AWQ(WeightQuantizer):
    """`quantizer=awq`: RTN on activation-scaled weights; `bits`, `group_size`, `grid`, `n_grid` (α points)."""

    needs = frozenset({"hessian", "act_absmean"})

    def __init__(self, bits: int = 4, group_size: int = -1, grid: str = "asym", n_grid: int = 20,
                 act_bits: int | None = None, act_granularity: str | None = None, act_group_size: int = 64):
        super().__init__(bits, group_size, grid, act_bits, act_granularity, act_group_size)
        if not isinstance(n_grid, int) or n_grid < 1:
            raise ConfigError(f"quantizer.n_grid={n_grid!r} must be an integer >= 1 (alpha in 0, 1/n_grid, ...)")
        self.n_grid = n_grid

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        W_hat, qw, s, alpha = awq_quantize(layer.weight.data, stats.hessian, stats.act_absmean, self.bits,
                                           self.group_size, self.grid, self.n_grid)
        self.finish(layer, W_hat, qw)
        layer_state(layer).input_scale = s.to(torch.float16)

    def __repr__(self):
        return f"AWQ({self._tag()}, n_grid={self.n_grid})"
