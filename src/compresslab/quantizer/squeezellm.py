"""SqueezeLLM: sensitivity-weighted non-uniform quantization with a dense-and-sparse split (Kim et al.,
"SqueezeLLM: Dense-and-Sparse Quantization", ICML 2024).

Per output row, the 2^b table values are the centroids of a 1-D k-means of the row's weights, each
weight counted with its sensitivity, the diagonal Fisher F_ij (fisher.py): minimising
Σ_j F_ij (w_ij − q(w_ij))², the second-order estimate of the loss increase (§3.1). Before clustering,
a small fraction of weights leaves the dense matrix and is kept exactly in fp16, sparse (§4): the
largest magnitudes (`outlier_fraction`, over the whole matrix) and the most sensitive (`sensitive_fraction`,
largest F). Those weights do not pull the centroids. A pruner's mask is held: pruned weights stay 0 and
take no part either.

Stored per Linear: b-bit codes, the (out, 2^b) fp16 tables and the outliers in CSR (row pointers, column
indices, fp16 values); all of it counts toward avg_bits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..stages import layer_state
from .base import WeightQuantizer
from .format import LUTWeight

ROW_CHUNK = 1024  # rows clustered at once (the working set is a few (rows, in) tensors)


def weighted_kmeans_rows(W: torch.Tensor, weight: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D weighted k-means of every row: (centroids (R, k) ascending, codes (R, n) int64).

    Lloyd's iterations from weighted quantiles (the i-th centroid starts where the row's cumulative weight
    reaches (i + ½)/k), all rows at once: in 1-D the nearest centroid is found by searching the sorted
    midpoints. A weight of 0 takes no part (its value is still assigned its nearest centroid); a centroid
    left without weight keeps its place. Stops when no code changes."""
    W, weight = W.float(), weight.float().clamp_min(0)
    R, n = W.shape
    order = W.argsort(1)
    Ws = W.gather(1, order)
    cw = weight.gather(1, order).cumsum(1)  # (R, n)
    empty = cw[:, -1] <= 0
    if empty.any():  # a row without weight: cluster it unweighted
        cw[empty] = torch.arange(1, n + 1, device=W.device, dtype=cw.dtype)
        weight = torch.where(empty[:, None], torch.ones_like(weight), weight)
    targets = cw[:, -1:] * (torch.arange(k, device=W.device, dtype=cw.dtype) + 0.5) / k  # (R, k)
    C = Ws.gather(1, torch.searchsorted(cw, targets).clamp_max(n - 1))
    codes = None
    for _ in range(iters):
        new = torch.searchsorted(((C[:, 1:] + C[:, :-1]) / 2).contiguous(), W)  # nearest centroid (R, n)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        mass = torch.zeros(R, k, device=W.device).scatter_add_(1, codes, weight)
        total = torch.zeros(R, k, device=W.device).scatter_add_(1, codes, weight * W)
        C = torch.where(mass > 0, total / mass.clamp_min(1e-30), C).sort(1).values
    codes = torch.searchsorted(((C[:, 1:] + C[:, :-1]) / 2).contiguous(), W)
    return C, codes


def select_outliers(W: torch.Tensor, F: torch.Tensor, keep: torch.Tensor | None, outlier_fraction: float,
                    sensitive_fraction: float) -> torch.Tensor:
    """(out, in) bool: the largest |w| (a fraction of all weights) and the largest F, among kept weights."""
    out = torch.zeros_like(W, dtype=torch.bool)
    for score, frac in ((W.abs(), outlier_fraction), (F, sensitive_fraction)):
        k = int(frac * W.numel())
        if k < 1:
            continue
        s = score.float().masked_fill(~keep, -1.0) if keep is not None else score.float()
        out.view(-1)[s.reshape(-1).topk(k).indices] = True
    return out if keep is None else out & keep


def squeezellm_quantize(W: torch.Tensor, F: torch.Tensor, bits: int, keep: torch.Tensor | None = None,
                        outlier_fraction: float = 0.0, sensitive_fraction: float = 0.0, iters: int = 50):
    """(Ŵ (out, in) float32, LUTWeight, outlier mask (out, in) bool) for W (out, in) with Fisher F (out, in)."""
    W = W.detach().float()
    F = F.to(W.device).float()
    sparse = select_outliers(W, F, keep, outlier_fraction, sensitive_fraction)
    dense = ~sparse if keep is None else keep & ~sparse
    weight = F * dense  # outliers and pruned weights do not pull the centroids
    luts, codes = [], []
    for r0 in range(0, W.shape[0], ROW_CHUNK):
        C, q = weighted_kmeans_rows(W[r0:r0 + ROW_CHUNK], weight[r0:r0 + ROW_CHUNK], 2 ** bits, iters)
        luts.append(C.half().float())  # the table as stored
        codes.append(q)
    lut = torch.cat(luts)
    lw = LUTWeight(None, lut, bits, tuple(W.shape)).encode(W)  # nearest entry of the rounded table
    W_hat = lw.dequantize()
    W_hat = torch.where(sparse, W.half().float(), W_hat)  # outliers exactly, in fp16
    if keep is not None:
        W_hat = W_hat * keep
    return W_hat, lw.without_codes(), sparse


class SqueezeLLM(WeightQuantizer):
    """`quantizer=squeezellm`.

    Args:
        bits: code bits (2^bits table entries per output row), 2..8.
        outlier_fraction: the largest-magnitude weights kept in fp16, as a fraction of the matrix.
        sensitive_fraction: the most sensitive weights (largest Fisher) kept in fp16.
        iters: Lloyd iterations at most.
        act_*: activation quantization, as every quantizer.
    """

    needs = frozenset({"fisher"})

    def __init__(self, bits: int = 4, outlier_fraction: float = 0.004, sensitive_fraction: float = 0.0005,
                 iters: int = 50, act_bits: int | None = None, act_granularity: str | None = None,
                 act_group_size: int = 64):
        super().__init__(bits, -1, "asym", act_bits, act_granularity, act_group_size)
        for key, v in (("outlier_fraction", outlier_fraction), ("sensitive_fraction", sensitive_fraction)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 0.5:
                raise ConfigError(f"quantizer.{key}={v!r} must be a fraction in [0, 0.5)")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ConfigError(f"quantizer.iters={iters!r} must be an int >= 1")
        self.outlier_fraction, self.sensitive_fraction, self.iters = outlier_fraction, sensitive_fraction, iters

    def check(self, name: str, layer: nn.Module) -> None:
        if self.act is not None:
            self.act.check(name, layer)

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        state = layer_state(layer, create=True)
        keep = state.keep_mask(layer.weight.device)
        W_hat, lw, sparse = squeezellm_quantize(layer.weight.data, stats.fisher_of(name), self.bits, keep,
                                                self.outlier_fraction, self.sensitive_fraction, self.iters)
        self.finish(layer, W_hat, None)
        state.lut = lw
        state.outliers = sparse.reshape(-1).nonzero().squeeze(1).cpu() if bool(sparse.any()) else None

    def __repr__(self):
        return (f"SqueezeLLM(W{self.bits}, outliers={self.outlier_fraction}, sensitive={self.sensitive_fraction}"
                f"{f', A{self.act.bits}' if self.act is not None else ''})")
