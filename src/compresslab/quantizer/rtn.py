"""Round-to-nearest (RTN) weight quantization with min/max (AbsMax when symmetric) ranges."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..stages import layer_state
from . import grid
from .format import QuantizedWeight


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = False,
                 granularity: str = "row") -> QuantizedWeight:
    """Quantize W (out, in) to `bits` by rounding to nearest on a per-group min/max grid.

    `group_size > 0` groups input columns per row; with -1, `granularity` picks one range per
    output row, per input column or for the whole tensor.
    """
    W = W.float()
    view, g = grid.group_reshape(W, group_size, granularity)  # (R, C, k)
    scale, zero = grid.qparams(view.amin(-1), view.amax(-1), bits, symmetric)  # (R, C)
    maxq = 2**bits - 1
    codes = grid.quantize(view, scale[..., None], zero[..., None], maxq)  # (R, C, k)
    if group_size <= 0 and granularity == "column":
        codes = codes.reshape(W.shape[1], W.shape[0]).T
    codes = codes.reshape(W.shape).to(torch.uint8)
    return QuantizedWeight(codes, scale, zero, bits, g, symmetric, tuple(W.shape))


class RTN:
    """`quantizer=rtn`: `bits`, `group_size` (-1 = per output channel), `symmetric`, `granularity`."""

    needs = frozenset()

    def __init__(self, bits: int = 4, group_size: int = -1, symmetric: bool = False, granularity: str = "row"):
        grid.check_bits(bits)
        if granularity not in grid.GRANULARITIES:
            raise ConfigError(f"unknown quantizer.granularity={granularity!r}; use one of {', '.join(grid.GRANULARITIES)}")
        if group_size > 0 and granularity != "row":
            raise ConfigError(f"quantizer.granularity={granularity} needs quantizer.group_size=-1 "
                              f"(groups are always per row); got group_size={group_size}")
        self.bits, self.group_size, self.symmetric, self.granularity = bits, group_size, symmetric, granularity

    def check(self, name: str, layer: nn.Module) -> None:
        grid.check_group_size(name, layer.in_features, self.group_size)

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats=None) -> None:
        qw = rtn_quantize(layer.weight.data, self.bits, self.group_size, self.symmetric, self.granularity)
        layer.weight.data.copy_(qw.dequantize(layer.weight.dtype))
        layer_state(layer, create=True).quant = qw.without_codes()

    def __repr__(self):
        return f"RTN(W{self.bits}, g{self.group_size}, {'sym' if self.symmetric else 'asym'}, {self.granularity})"
