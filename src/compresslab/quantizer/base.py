"""What every weight quantizer shares: bits, group size, grid (asym | sym | absmax), activation quantization."""

from __future__ import annotations

import torch
from torch import nn

from ..stages import layer_state
from . import grid as _grid
from .activations import ActQuant
from .format import QuantizedWeight


class WeightQuantizer:
    """Base of `quantizer=...` stages. Subclasses implement `quantize(name, W, stats) -> (W_hat, qw)`.

    Args:
        bits: weight bits, 2..8.
        group_size: input columns per (scale, zero); -1 = one per output row.
        grid: asym (min/max) | sym (GPTQ's symmetric) | absmax (levels ±(2^(b−1)−1)); see grid.py.
        act_bits: quantize each compressed Linear's input to this many bits (null = off);
            8 is FP8 e4m3 per tensor, fewer bits are int per token or per group.
        act_granularity: tensor | token | group (null: tensor for 8 bits, else token).
        act_group_size: channels per group with act_granularity=group.
    """

    needs: frozenset[str] = frozenset()

    grids: tuple[str, ...] = _grid.GRIDS  # the grids a method supports

    def __init__(self, bits: int = 4, group_size: int = -1, grid: str = "asym",
                 act_bits: int | None = None, act_granularity: str | None = None, act_group_size: int = 64):
        _grid.check_bits(bits)
        _grid.check_grid(grid, self.grids)
        self.bits, self.group_size, self.grid = bits, group_size, grid
        self.act = ActQuant(act_bits, act_granularity, act_group_size) if act_bits is not None else None

    def check(self, name: str, layer: nn.Module) -> None:
        _grid.check_group_size(name, layer.in_features, self.group_size)
        if self.act is not None:
            self.act.check(name, layer)

    bit_range = (2, 8)  # the bits a method takes (an allocation's per-layer levels are held to it)

    def check_level(self, key: str, value) -> None:
        """An allocation's per-layer `bits` (allocation/): the range __init__ enforces."""
        if key == "bits":
            _grid.check_bits(value, *self.bit_range)

    def quantize(self, name: str, W: torch.Tensor, stats) -> tuple[torch.Tensor, QuantizedWeight]:
        raise NotImplementedError

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats=None) -> None:
        W_hat, qw = self.quantize(name, layer.weight.data, stats)
        self.finish(layer, W_hat, qw)

    def finish(self, layer: nn.Linear, W_hat: torch.Tensor, qw: QuantizedWeight | None) -> None:
        """Write the fake-quantized weight back, record the grid, attach the activation hook."""
        layer.weight.data.copy_(W_hat.to(layer.weight.dtype))
        state = layer_state(layer, create=True)
        if qw is not None:
            state.quant = qw.without_codes()
        if self.act is not None and state.act is None:
            state.act = self.act
            layer.register_forward_pre_hook(self.act)

    def _tag(self) -> str:
        act = f", A{self.act.bits}" if self.act is not None else ""
        return f"W{self.bits}, g{self.group_size}, {self.grid}{act}"
