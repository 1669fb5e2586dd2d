"""SparseGPT: OBS pruning with an adaptive mask per block (Frantar & Alistarh, ICML 2023).

`sparsegpt_prune(W, H, ...)` is the maths (the shared OBS sweep in `compresslab.obs`). With
`quantizer=gptq`, the pruner absorbs the quantizer (`fuse`) and prunes and quantizes in one pass
over the Hessian, as SparseGPT's joint mode does. One pass has one damping and one block size:
the joint mode needs `pruner.percdamp == quantizer.percdamp` and `pruner.blocksize ==
quantizer.blocksize` (both default to 0.01 and 128) and fails before loading the model otherwise.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..obs import GridSpec, PruneSpec, obs_compress
from ..stages import layer_state, sweep_stacked
from .base import Pruner

log = logging.getLogger(__name__)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    percdamp: float = 0.01, blocksize: int = 128, quant: GridSpec | None = None,
                    name: str = "", numerics: list | None = None, segments: list[int] | None = None,
                    overwrite: bool = False):
    """Prune W (out, in) to `sparsity` (or N:M) given H = 2/n·XᵀX. Returns (W_hat, keep, qw or None).
    `segments`: row counts of Linears stacked in W (one sweep, each keeps its own sparsity);
    `overwrite`: W may become the result (obs_compress)."""
    W_hat, qw, keep = obs_compress(W, H, quant=quant, prune=PruneSpec(sparsity, nm), percdamp=percdamp,
                                   blocksize=blocksize, name=name, numerics=numerics, segments=segments,
                                   overwrite=overwrite)
    return W_hat, keep, qw


class SparseGPT(Pruner):
    """`pruner=sparsegpt`: `sparsity`, `pattern`, `percdamp` (0.01), `blocksize` (128), `joint` (true:
    absorb a grouped quantizer=gptq into one pass; false, or a per-row GPTQ grid: two passes, GPTQ
    holding SparseGPT's mask)."""

    needs = frozenset({"hessian"})

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", percdamp: float = 0.01,
                 blocksize: int = 128, joint: bool = True):
        super().__init__(sparsity, pattern)
        if not 0 <= percdamp < 1 or blocksize < 1:
            raise ConfigError(f"pruner.percdamp={percdamp} must be in [0, 1) and pruner.blocksize={blocksize} >= 1")
        if not isinstance(joint, bool):
            raise ConfigError(f"pruner.joint={joint!r} must be true (one pass with quantizer=gptq) or false "
                              "(prune, then quantize the pruned weights holding the mask)")
        self.percdamp, self.blocksize, self.joint = percdamp, blocksize, joint


    def row_parallel(self, layer) -> bool:
        """N:M masks are chosen within each row, so blocks of rows may be pruned apart (distributed.py);
        an unstructured mask's threshold spans the rows of a column block."""
        return self.nm is not None
    def prune(self, name, W, stats, numerics=None):
        W_hat, keep, _ = sparsegpt_prune(W, stats.hessian, self.sparsity, self.nm, self.percdamp,
                                         self.blocksize, name=name, numerics=numerics)
        return W_hat, keep

    @torch.no_grad()
    def compress_group(self, items, stats):
        """The Linears that share this input in ONE sweep (rows are independent; the unstructured
        threshold is each Linear's own), as separate sweeps would."""
        if self.dense:
            return
        def sweep(W, _keep, name, sizes, numerics):
            return sparsegpt_prune(W, stats.hessian, self.sparsity, self.nm, self.percdamp, self.blocksize,
                                   name=name, numerics=numerics, segments=sizes, overwrite=True)

        def write(lin, r, out):
            W_hat, keep, _ = out
            lin.weight.data.copy_(W_hat[r].to(lin.weight.dtype))
            layer_state(lin).pattern, layer_state(lin).mask = self.pattern, keep[r]

        sweep_stacked(items, sweep, write)

    def fuse(self, quantizer):
        """Absorb `quantizer=gptq`: one OBS pass that prunes and quantizes (same damping and block
        size for both, or a ConfigError naming the two values)."""
        from ..quantizer.gptq import GPTQ

        if not self.joint or not isinstance(quantizer, GPTQ) or quantizer.act_order:
            return None
        if quantizer.group_size <= 0 or quantizer.static_groups:
            # A range fixed from W before the sweep (one per row, or static groups) is then overrun by
            # the pruning's compensation moving the kept weights: 2:4 + W4 per row, layer error 0.329 joint
            # vs 0.282 in two passes (experiments/results/joint_rule.md). Dynamic group ranges are taken
            # as the sweep reaches them.
            log.info("sparsegpt + gptq with a range fixed before the sweep (%s): two passes, GPTQ holding "
                     "SparseGPT's mask", "per row" if quantizer.group_size <= 0 else "static groups")
            return None
        for key in ("percdamp", "blocksize"):
            p, q = getattr(self, key), getattr(quantizer, key)
            if p != q:
                raise ConfigError(
                    f"pruner=sparsegpt with quantizer=gptq prunes and quantizes in ONE pass over the Hessian, "
                    f"which has one {key}: got pruner.{key}={p} and quantizer.{key}={q}. Set both to the same "
                    f"value (e.g. pruner.{key}={q} quantizer.{key}={q})")
        return JointSparseGPTQ(self, quantizer)


class JointSparseGPTQ:
    """SparseGPT + GPTQ in one sweep: each column is masked, rounded, and its error propagated."""

    def __init__(self, pruner: SparseGPT, quantizer):
        self.pruner, self.quantizer = pruner, quantizer
        self.needs = pruner.needs | quantizer.needs

    def row_parallel(self, layer) -> bool:
        return self.pruner.row_parallel(layer) and getattr(self.quantizer, "row_parallel", lambda _: False)(layer)

    def check(self, name, layer):
        self.pruner.check(name, layer)
        self.quantizer.check(name, layer)

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        p, q = self.pruner, self.quantizer
        if p.dense:  # an allocation left this layer unpruned: GPTQ alone
            return q.compress(name, layer, stats)
        spec = GridSpec(q.bits, q.group_size, q.grid, q.static_groups)
        state = layer_state(layer, create=True)
        W_hat, keep, qw = sparsegpt_prune(layer.weight.data, stats.hessian, p.sparsity, p.nm, p.percdamp,
                                          p.blocksize, quant=spec, name=name, numerics=state.numerics)
        state.pattern, state.mask = p.pattern, keep.bool()
        q.finish(layer, W_hat, qw)

    @torch.no_grad()
    def compress_group(self, items, stats):
        """Prune and quantize the Linears that share this input in ONE sweep."""
        p, q = self.pruner, self.quantizer
        if p.dense:
            return q.compress_group(items, stats)
        spec = GridSpec(q.bits, q.group_size, q.grid, q.static_groups)
        def sweep(W, _keep, name, sizes, numerics):
            return sparsegpt_prune(W, stats.hessian, p.sparsity, p.nm, p.percdamp, p.blocksize, quant=spec,
                                   name=name, numerics=numerics, segments=sizes, overwrite=True)

        def write(lin, r, out):
            W_hat, keep, qw = out
            layer_state(lin).pattern, layer_state(lin).mask = p.pattern, keep[r]
            q.finish(lin, W_hat[r], qw.rows(r.start, r.stop))

        sweep_stacked(items, sweep, write)

    def __repr__(self):
        return f"JointSparseGPTQ({self.pruner!r} + {self.quantizer!r})"
