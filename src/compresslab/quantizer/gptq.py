"""GPTQ: Hessian-aware weight quantization (Frantar et al., ICLR 2023).

The maths is `gptq_quantize(W, H, ...)`, a thin wrapper over the shared OBS sweep in
`compresslab.obs`; the class is the glue the YAML instantiates.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..obs import GridSpec, obs_compress
from ..stages import layer_state, sweep_stacked
from .base import WeightQuantizer
from .format import QuantizedWeight

log = logging.getLogger(__name__)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, grid: str = "asym",
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128, keep: torch.Tensor | None = None,
                  name: str = "", numerics: list | None = None, overwrite: bool = False
                  ) -> tuple[torch.Tensor, QuantizedWeight]:
    """Quantize W (out, in) given H = 2/n·XᵀX (in, in); `keep` holds an existing sparsity mask;
    `overwrite`: W may become the result (obs_compress)."""
    spec = GridSpec(bits, group_size, grid, static_groups)
    W_hat, qw, _ = obs_compress(W, H, quant=spec, keep=keep, act_order=act_order, percdamp=percdamp,
                                blocksize=blocksize, name=name, numerics=numerics, overwrite=overwrite)
    return W_hat, qw


class GPTQ(WeightQuantizer):
    """`quantizer=gptq`.

    Args (beyond bits, group_size, grid and the act_* options):
        act_order: quantize columns by decreasing H_jj.
        static_groups: fix the group ranges from W before the sweep. null = auto, i.e. on when
            act_order is on with groups: groups then stay contiguous, which the packed format
            and the kernels need (there is no g_idx).
        true_sequential: compress q/k/v, then o, then gate/up, then down, each on inputs that
            went through the already-compressed Linears. The engine always runs in this order;
            false is rejected rather than silently ignored.
        percdamp: damping λ = percdamp·mean(diag H); grown ×10 up to 3 times if Cholesky fails.
        blocksize: columns per lazy-update block.
    """

    needs = frozenset({"hessian"})

    def __init__(self, bits: int = 4, group_size: int = -1, grid: str = "asym", act_order: bool = False,
                 static_groups: bool | None = None, true_sequential: bool = True, percdamp: float = 0.01,
                 blocksize: int = 128, act_bits: int | None = None, act_granularity: str | None = None,
                 act_group_size: int = 64):
        super().__init__(bits, group_size, grid, act_bits, act_granularity, act_group_size)
        if static_groups is None:
            static_groups = act_order and group_size > 0
        if act_order and group_size > 0 and not static_groups:
            raise ConfigError("quantizer.act_order=true with groups needs quantizer.static_groups=true (or null): "
                              "groups must stay contiguous columns for the packed format and kernels")
        if not true_sequential:
            raise ConfigError("quantizer.true_sequential=false is not supported: the engine always compresses "
                              "Linear groups in order on inputs from the already-compressed ones")
        if not 0 <= percdamp < 1 or blocksize < 1:
            raise ConfigError(f"quantizer.percdamp={percdamp} must be in [0, 1) and blocksize={blocksize} >= 1")
        self.act_order, self.static_groups, self.true_sequential = act_order, static_groups, true_sequential
        self.percdamp, self.blocksize = percdamp, blocksize

    def row_parallel(self, layer) -> bool:
        """Rows never interact in the sweep (per-row grids; the column order and H are shared): blocks of
        rows may be compressed apart (distributed.py) with the result of the whole."""
        return self.act is None

    def quantize(self, name, W, stats, keep=None, numerics=None, overwrite=False):
        return gptq_quantize(W, stats.hessian, self.bits, self.group_size, self.grid, self.act_order,
                             self.static_groups, self.percdamp, self.blocksize, keep=keep, name=name,
                             numerics=numerics, overwrite=overwrite)

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        state = layer_state(layer, create=True)
        keep = state.keep_mask(layer.weight.device)  # hold an earlier pruner's mask
        W_hat, qw = self.quantize(name, layer.weight.data, stats, keep, state.numerics)
        self.finish(layer, W_hat, qw)

    @torch.no_grad()
    def compress_group(self, items, stats):
        """The Linears that share this input (q/k/v, gate/up) in ONE sweep: same H, damping, Cholesky
        and column order, and rows never interact, so the result is that of separate sweeps."""
        sweep_stacked(items, lambda W, keep, name, sizes, numerics: self.quantize(name, W, stats, keep, numerics,
                                                                                  overwrite=True),
                      lambda lin, r, out: self.finish(lin, out[0][r], out[1].rows(r.start, r.stop)))

    def __repr__(self):
        return f"GPTQ({self._tag()}, act_order={self.act_order}, static_groups={self.static_groups})"
