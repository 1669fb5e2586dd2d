"""The one quantized-weight format: integer codes, scales, zeros, group size, bits.

Layout: scales and zeros have shape (R, C) with R in {1, out} and C = in / group_size, so
per-group (R=out, C=in/g), per-row (R=out, C=1), per-column (R=1, C=in, g=1) and per-tensor
(R=C=1) all share one code path. Dequantization is W = s · (q − z).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .grid import GRIDS, max_code

SCALE_BITS = 16  # scales are stored as fp16/bf16


@dataclass
class QuantizedWeight:
    codes: torch.Tensor | None  # (out, in) uint8, or None when dropped (they follow from W, s, z)
    scales: torch.Tensor  # (R, C) float
    zeros: torch.Tensor  # (R, C) float holding integers in [0, 2^bits - 1]
    bits: int
    group_size: int  # input columns per group (in_features for one group per row)
    grid: str  # asym | sym | absmax (quantizer.grid); symmetric grids' zeros are constants, not stored
    shape: tuple[int, int]
    # (C,) bits of each input group (mixed precision); None: `bits`. (R, C) only transiently, for
    # Linears stacked in one sweep; rows() gives each Linear its (C,) map back
    bit_map: torch.Tensor | None = None
    # SpQR: scales (and asym zeros) themselves quantized, {"bits", "group", "scales": (codes (R, C) uint8,
    # step (⌈R/group⌉, C), low (⌈R/group⌉, C)), "zeros": (...)}; `scales`/`zeros` hold their values
    stat: dict | None = None

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"QuantizedWeight.grid={self.grid!r}; use one of {GRIDS}")

    @property
    def symmetric(self) -> bool:
        return self.grid != "asym"

    @property
    def maxq(self) -> int:
        return max_code(self.bits, self.grid)

    def _maxq_full(self):
        """Largest code per element: a scalar, or (1 or R, in) with a bit map."""
        return self.maxq if self.bit_map is None else self.expand(self._maxq_groups())

    def _maxq_groups(self) -> torch.Tensor:
        """Largest code per group with a bit map: (1 or R, C)."""
        m = max_code(self.bit_map.to(self.scales.device).float(), self.grid)
        return m if m.dim() == 2 else m[None, :]

    def _per_group(self, t: torch.Tensor) -> torch.Tensor:
        """(R, C) group parameters -> (R, C, 1), broadcastable against the (out, C, g) view of a weight."""
        return t[:, :, None]

    def code_bits(self) -> int:
        """Bits of the integer codes alone."""
        out, inp = self.shape
        if self.bit_map is None:
            return out * inp * self.bits
        return int(out * self.group_size * self.bit_map.sum())

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """(R, C) group parameters -> broadcastable to (out, in)."""
        return t.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.codes is None:
            raise ValueError("codes were dropped; use encode(W) first")
        out, inp = self.shape
        w = self.codes.float().reshape(out, -1, self.group_size)  # (out, C, g): one float buffer
        w = w.sub_(self._per_group(self.zeros.float())).mul_(self._per_group(self.scales.float()))
        return w.reshape(out, inp).to(dtype)

    def encode(self, W: torch.Tensor) -> "QuantizedWeight":
        """Codes of a weight that lies on this grid (e.g. after the codes were dropped)."""
        if tuple(W.shape) != tuple(self.shape):
            raise ValueError(f"encode: W has shape {tuple(W.shape)}, the grid is for {tuple(self.shape)}")
        s, z = self._per_group(self.scales.float()), self._per_group(self.zeros.float())
        out, inp = self.shape
        # (out, C, g) views and one float buffer: a weight-sized temporary, not one per operation
        q = torch.div(W.float().reshape(out, -1, self.group_size), s)
        # round(w/s) + z for integer zeros (GPTQ's order); round(w/s + z) when the zeros are quantized
        # values themselves (SpQR), so that a weight on the grid gets its own code back
        q = q.add_(z).round_() if self.stat is not None else q.round_().add_(z)
        q.clamp_(min=0)
        if self.bit_map is None:
            q.clamp_(max=self.maxq)
        else:
            torch.minimum(q, self._per_group(self._maxq_groups()), out=q)
        return replace(self, codes=q.to(torch.uint8).reshape(out, inp))

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The grid of output rows start..stop (per-row parameters: scales (out, C)), e.g. one Linear
        of several that went through one stacked sweep."""
        if self.scales.shape[0] != self.shape[0]:
            raise ValueError("rows() needs per-row parameters (scales of shape (out, groups))")
        sl = slice(start, stop)
        bit_map = self.bit_map
        if bit_map is not None and bit_map.dim() == 2:  # a per-row map: these rows share one
            bit_map = bit_map[sl]
            if not bool((bit_map == bit_map[:1]).all()):
                raise ValueError(f"rows {start}..{stop} do not share one bit map")
            bit_map = bit_map[0].clone()
        return replace(self, codes=None if self.codes is None else self.codes[sl], scales=self.scales[sl],
                       zeros=self.zeros[sl], shape=(stop - start, self.shape[1]), bit_map=bit_map)

    @staticmethod
    def stack_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """The grid of the rows of `parts` one after another (the inverse of `rows`)."""
        first = parts[0]
        codes = None if any(p.codes is None for p in parts) else torch.cat([p.codes for p in parts])
        return replace(first, codes=codes, scales=torch.cat([p.scales for p in parts]),
                       zeros=torch.cat([p.zeros for p in parts]),
                       shape=(sum(p.shape[0] for p in parts), first.shape[1]))

    def without_codes(self) -> "QuantizedWeight":
        return replace(self, codes=None)

    def storage_bits(self) -> int:
        """Bits to store codes + scales (fp16) + zeros (as wide as the group's codes; none when
        symmetric) + the bit map (one byte per group)."""
        if self.symmetric:
            zero_bits = 0
        elif self.bit_map is None:
            zero_bits = self.scales.numel() * self.bits
        else:
            zero_bits = int(self.scales.shape[0] * self.bit_map.sum())
        map_bits = 0 if self.bit_map is None else 8 * self.bit_map.numel()
        scale_bits = self.scales.numel() * SCALE_BITS
        if self.stat is not None:  # codes at the stat width + an fp16 step and low per chunk of rows
            scale_bits, zero_bits = (sum(c.numel() * self.stat["bits"] + 2 * SCALE_BITS * st.numel()
                                         for c, st, _ in [self.stat[k]]) if k in self.stat else 0
                                     for k in ("scales", "zeros"))
        return self.code_bits() + scale_bits + zero_bits + map_bits

    def avg_bits(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])


@dataclass
class LUTWeight:
    """Non-uniform codes (SqueezeLLM): W[i, j] = lut[i, codes[i, j]], one sorted table of 2^bits values per
    output row, stored in fp16 (the values here are already fp16-representable, so `encode` is exact)."""

    codes: torch.Tensor | None  # (out, in) uint8, or None when dropped (they follow from W and the table)
    lut: torch.Tensor  # (out, 2^bits) float, ascending per row
    bits: int
    shape: tuple[int, int]

    def encode(self, W: torch.Tensor) -> "LUTWeight":
        """Codes of the nearest table entry per weight (exact for weights on the table)."""
        lut = self.lut.float().to(W.device)
        mids = (lut[:, 1:] + lut[:, :-1]) / 2  # (out, 2^b − 1)
        codes = torch.searchsorted(mids.contiguous(), W.float().contiguous())
        return replace(self, codes=codes.to(torch.uint8))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.codes is None:
            raise ValueError("codes were dropped; use encode(W) first")
        return self.lut.float().to(self.codes.device).gather(1, self.codes.long()).to(dtype)

    def without_codes(self) -> "LUTWeight":
        return replace(self, codes=None)

    def storage_bits(self) -> int:
        out, inp = self.shape
        return out * inp * self.bits + self.lut.numel() * SCALE_BITS
