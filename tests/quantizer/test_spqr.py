"""SpQR against a plain, column-by-column rewrite of the paper's algorithm, and its special cases."""

import pytest
import torch

from compresslab.errors import ConfigError
from compresslab.quantizer.gptq import gptq_quantize
from compresslab.quantizer.grid import quantize_stat
from compresslab.quantizer.spqr import SpQR, spqr_quantize
from conftest import correlated_inputs, hessian_of


def plain_spqr(W, H, bits, g, stat_bits, stat_group, thr, percdamp=0.01):
    """SpQR as the paper states it, one column at a time in float64, no lazy blocks."""
    W = W.double().clone()
    out, d = W.shape
    H = H.double()
    Hd = H + percdamp * H.diag().mean() * torch.eye(d, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    maxq = 2 ** bits - 1
    tau = thr * float((W.var(0) / U.diag() ** 2).mean())

    def fit(lo, hi):  # min/max grid containing 0, fp16 scale, integer zero
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if lo == hi == 0:
            lo, hi = -1.0, 1.0
        s = max(float(torch.tensor((hi - lo) / maxq).half().float()), 2 ** -24)
        return s, float(round(-lo / s))

    def second_level(v):  # each chunk of stat_group rows on its own min/max grid of stat_bits
        res = []
        for c0 in range(0, len(v), stat_group):
            chunk = v[c0:c0 + stat_group]
            low = float(torch.tensor(min(chunk)).half().float())
            span = (max(chunk) - low) / (2 ** stat_bits - 1)
            step = max(float(torch.tensor(span if span > 0 else 1.0).half().float()), 2 ** -24)
            res += [low + step * min(max(round((x - low) / step), 0), 2 ** stat_bits - 1) for x in chunk]
        return res

    Q = torch.zeros_like(W)
    sparse = torch.zeros(out, d, dtype=torch.bool)
    for j in range(d):
        if j % g == 0:
            scales, zeros = [], []
            for r in range(out):
                row = [float(x) for x in W[r, j:j + g]]
                likely = []
                for k, x in enumerate(row):  # leave-one-out: the range of the others
                    others = row[:k] + row[k + 1:]
                    s, z = fit(min(others), max(others))
                    qx = s * (min(max(round(x / s) + z, 0), maxq) - z)
                    likely.append(((x - qx) / float(U[j + k, j + k])) ** 2 > tau)
                rest = [x for x, o in zip(row, likely) if not o]
                mean = sum(rest) / max(len(rest), 1)
                fitted = [mean if o else x for x, o in zip(row, likely)]
                s, z = fit(min(fitted), max(fitted))
                scales.append(s)
                zeros.append(z)
            scales = [max(v, 2 ** -24) for v in second_level(scales)]
            zeros = second_level(zeros)
        for r in range(out):
            w = float(W[r, j])
            q = scales[r] * (min(max(round(w / scales[r] + zeros[r]), 0), maxq) - zeros[r])
            if ((w - q) / float(U[j, j])) ** 2 > tau:
                q = float(torch.tensor(w).half().float())
                sparse[r, j] = True
            Q[r, j] = q
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return Q, sparse


def test_matches_the_plain_column_by_column_algorithm():
    torch.manual_seed(0)
    X = correlated_inputs(512, 32, seed=3)
    W = torch.randn(20, 32)
    W[4, 9], W[11, 20] = 9.0, -7.0
    H = hessian_of(X)
    W_hat, qw, sparse = spqr_quantize(W, H, 3, group_size=8, stat_bits=3, stat_group=8, outlier_threshold=0.2,
                                      blocksize=16)
    Q, ref_sparse = plain_spqr(W, H, 3, 8, 3, 8, 0.2)
    assert torch.equal(sparse, ref_sparse)
    torch.testing.assert_close(W_hat.double(), Q, atol=2e-4, rtol=2e-4)
    assert 0 < int(sparse.sum()) < W.numel() // 4 and sparse[4, 9]
    # everything but the outliers lies on the stored grid
    torch.testing.assert_close(qw.encode(W_hat).dequantize()[~sparse], W_hat[~sparse], atol=1e-6, rtol=0)


def test_without_outliers_and_stat_quantization_it_is_gptq():
    X = correlated_inputs(512, 64, seed=1)
    W = torch.randn(24, 64)
    H = hessian_of(X)
    W_hat, qw, sparse = spqr_quantize(W, H, 3, group_size=16, stat_bits=None, outlier_threshold=None)
    W_gptq, qw_gptq = gptq_quantize(W, H, 3, 16)
    assert torch.equal(W_hat, W_gptq) and not sparse.any()
    assert torch.equal(qw.encode(W_hat).codes, qw_gptq.encode(W_gptq).codes)


def test_quantize_stat_by_hand():
    v = torch.tensor([0.10, 0.20, 0.40, 0.80, 5.0, 5.0])
    vals, codes, step, low = quantize_stat(v, 2, 4)  # chunks [0.1 .. 0.8] and [5, 5] (padded)
    assert step.shape == (2,) and float(low[1]) == 5.0
    lo = float(torch.tensor(0.1).half().float())  # the stored low, fp16
    s = float(torch.tensor((0.8 - lo) / 3).half().float())  # the step from it to the max, fp16
    want = [lo + s * round((x - lo) / s) for x in (0.1, 0.2, 0.4, 0.8)]
    torch.testing.assert_close(vals[:4], torch.tensor(want), atol=1e-7, rtol=0)
    assert vals[4] == vals[5] == 5.0 and codes.tolist() == [round((x - lo) / s) for x in (0.1, 0.2, 0.4, 0.8)] + [0, 0]


def test_avg_bits_counts_codes_statistics_and_outliers():
    from torch import nn

    from compresslab.metrics import layer_storage_bits
    from compresslab.stages import layer_state
    from compresslab.stats import LayerStats

    X = correlated_inputs(512, 64, seed=2)
    stats = LayerStats({"hessian"}, 64)
    stats.add_batch(X)
    lin = nn.Linear(64, 32, bias=False)
    SpQR(bits=3, group_size=16).compress("l", lin, stats)
    nnz = layer_state(lin).outliers.numel()
    groups, chunks = 64 // 16, 32 // 16
    bits = 3 * 32 * 64 + 2 * (3 * 32 * groups + 2 * 16 * chunks * groups) + nnz * (16 + 16) + 32 * 33
    words = lambda n_bits: -(-n_bits // 32) * 32  # noqa: E731  codes are packed into int32 words
    packed = words(3 * 32 * 64) + 2 * (words(3 * 32 * groups) + 2 * 16 * chunks * groups) + nnz * 32 + 32 * 33
    assert layer_storage_bits(lin) == packed and abs(packed - bits) < 64


def test_bad_options_fail_at_once():
    for kw in ({"group_size": 1}, {"stat_bits": 1}, {"stat_group": 0}, {"outlier_threshold": 0}, {"grid": "sym"}):
        with pytest.raises((ConfigError, TypeError)):
            SpQR(**kw)
