"""SpQR: small-group GPTQ with quantized statistics and unstructured fp16 outliers (Dettmers et al.,
"SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression", ICLR 2024).

The maths is the shared OBS sweep (obs.py) with three of SpQR's parts switched on: groups of
`group_size` (16) input columns whose ranges are fit leaving likely outliers out (leave-one-out), each
group's scales and zeros quantized again to `stat_bits` (3) on a min/max grid per `stat_group` (16)
output rows, and weights whose OBS error exceeds `outlier_threshold` × the layer's mean scaled variance
kept exactly in fp16 (chosen during the sweep, so the others compensate for them as for any column).
Stored per Linear: codes, the statistics' codes and chunk (step, low) pairs, and the outliers in CSR;
all of it counts toward avg_bits.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..obs import GridSpec, obs_compress
from ..quantizer.grid import check_bits
from ..stages import layer_state
from .base import WeightQuantizer
from .format import QuantizedWeight


def spqr_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 16, stat_bits: int | None = 3,
                  stat_group: int = 16, outlier_threshold: float | None = 0.2, percdamp: float = 0.01,
                  blocksize: int = 128, keep: torch.Tensor | None = None, name: str = "",
                  numerics: list | None = None) -> tuple[torch.Tensor, QuantizedWeight, torch.Tensor]:
    """(Ŵ (out, in), QuantizedWeight with its quantized statistics, outlier mask (out, in) bool)."""
    spec = GridSpec(bits, group_size, "asym", stat_bits=stat_bits, stat_group=stat_group)
    found: list = []
    W_hat, qw, _ = obs_compress(W, H, quant=spec, keep=keep, percdamp=percdamp, blocksize=blocksize, name=name,
                                numerics=numerics, outlier_threshold=outlier_threshold, outliers=found)
    sparse = found[0] if found else torch.zeros_like(W_hat, dtype=torch.bool)
    return W_hat, qw, sparse


class SpQR(WeightQuantizer):
    """`quantizer=spqr`.

    Args:
        bits: code bits, 2..8.
        group_size: input columns per (scale, zero); SpQR's β1 = 16.
        stat_bits: bits of the quantized scales and zeros (null: fp16 scales, integer zeros as GPTQ).
        stat_group: output rows sharing one second-level (step, low); SpQR's β2 = 16.
        outlier_threshold: τ relative to mean_j(var_i W_ij / U_jj²) (SpQR's 0.2); null: no outliers.
        percdamp, blocksize: as GPTQ's.
    """

    needs = frozenset({"hessian"})
    grids = ("asym",)

    def __init__(self, bits: int = 3, group_size: int = 16, stat_bits: int | None = 3, stat_group: int = 16,
                 outlier_threshold: float | None = 0.2, percdamp: float = 0.01, blocksize: int = 128,
                 act_bits: int | None = None, act_granularity: str | None = None, act_group_size: int = 64):
        super().__init__(bits, group_size, "asym", act_bits, act_granularity, act_group_size)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ConfigError(f"quantizer.group_size={group_size!r}: SpQR fits each group's range leaving one weight "
                              "out at a time, so groups need >= 2 columns (16 in the paper)")
        if stat_bits is not None:
            check_bits(stat_bits)
        if isinstance(stat_group, bool) or not isinstance(stat_group, int) or stat_group < 1:
            raise ConfigError(f"quantizer.stat_group={stat_group!r} must be an int >= 1 (output rows per second-level grid)")
        if outlier_threshold is not None and (isinstance(outlier_threshold, bool)
                                              or not isinstance(outlier_threshold, (int, float)) or outlier_threshold <= 0):
            raise ConfigError(f"quantizer.outlier_threshold={outlier_threshold!r} must be > 0, or null for no outliers")
        if not 0 <= percdamp < 1 or blocksize < 1:
            raise ConfigError(f"quantizer.percdamp={percdamp} must be in [0, 1) and blocksize={blocksize} >= 1")
        self.stat_bits, self.stat_group, self.outlier_threshold = stat_bits, stat_group, outlier_threshold
        self.percdamp, self.blocksize = percdamp, blocksize

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        state = layer_state(layer, create=True)
        keep = state.keep_mask(layer.weight.device)
        W_hat, qw, sparse = spqr_quantize(layer.weight.data, stats.hessian, self.bits, self.group_size, self.stat_bits,
                                          self.stat_group, self.outlier_threshold, self.percdamp, self.blocksize,
                                          keep, name, state.numerics)
        self.finish(layer, W_hat, qw)
        state.outliers = sparse.reshape(-1).nonzero().squeeze(1).cpu() if bool(sparse.any()) else None

    def __repr__(self):
        return (f"SpQR({self._tag()}, stats={self.stat_bits}b/{self.stat_group}, "
                f"outlier_threshold={self.outlier_threshold})")
