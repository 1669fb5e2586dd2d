"""`quantizer=absmax`: the SLiM seed's Group AbsMax baseline — round to nearest on the true
symmetric grid, scale max|w|/(2^(b−1)−1) per group, levels −(2^(b−1)−1)…(2^(b−1)−1)
(Mozaffari et al., "SLiM", ICML 2025, the baseline its SLiM-Quant is compared with). It is RTN with
`grid=absmax`, kept as its own option so that sweeps and presets can name it."""

from __future__ import annotations

from .rtn import RTN


class AbsMax(RTN):
    """`bits`, `group_size` (-1 = one range per output row) and the act_* options."""

    grids = ("absmax",)

    def __init__(self, bits: int = 4, group_size: int = 128, act_bits: int | None = None,
                 act_granularity: str | None = None, act_group_size: int = 64):
        super().__init__(bits, group_size, "absmax", "row", act_bits, act_granularity, act_group_size)

    def __repr__(self):
        return f"AbsMax({self._tag()})"
