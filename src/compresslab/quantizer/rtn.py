"""Round-to-nearest (RTN) weight quantization on a min/max, GPTQ-symmetric or AbsMax grid."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import grid as _grid
from .base import WeightQuantizer
from .format import QuantizedWeight


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, grid: str = "asym",
                 granularity: str = "row") -> QuantizedWeight:
    """Quantize W (out, in) to `bits` by rounding to nearest on a per-group grid (`grid`: asym | sym | absmax).

    `group_size > 0` groups input columns per row; with -1, `granularity` picks one range per
    output row, per input column or for the whole tensor.
    """
    W = W.float()
    view, g = _grid.group_reshape(W, group_size, granularity)  # (R, C, k)
    scale, zero = _grid.qparams(view.amin(-1), view.amax(-1), bits, grid)  # (R, C)
    maxq = _grid.max_code(bits, grid)
    codes = _grid.quantize(view, scale[..., None], zero[..., None], maxq)  # (R, C, k)
    if group_size <= 0 and granularity == "column":
        codes = codes.reshape(W.shape[1], W.shape[0]).T
    codes = codes.reshape(W.shape).to(torch.uint8)
    return QuantizedWeight(codes, scale, zero, bits, g, grid, tuple(W.shape))


class RTN(WeightQuantizer):
    """`quantizer=rtn`: `bits`, `group_size` (-1 = per output channel), `grid`, `granularity`."""

    def __init__(self, bits: int = 4, group_size: int = -1, grid: str = "asym", granularity: str = "row",
                 act_bits: int | None = None, act_granularity: str | None = None, act_group_size: int = 64):
        super().__init__(bits, group_size, grid, act_bits, act_granularity, act_group_size)
        if granularity not in _grid.GRANULARITIES:
            raise ConfigError(f"unknown quantizer.granularity={granularity!r}; use one of {', '.join(_grid.GRANULARITIES)}")
        if group_size > 0 and granularity != "row":
            raise ConfigError(f"quantizer.granularity={granularity} needs quantizer.group_size=-1 "
                              f"(groups are always per row); got group_size={group_size}")
        self.granularity = granularity

    def quantize(self, name, W, stats=None):
        qw = rtn_quantize(W, self.bits, self.group_size, self.grid, self.granularity)
        return qw.dequantize(), qw

    def __repr__(self):
        return f"RTN({self._tag()}, {self.granularity})"
