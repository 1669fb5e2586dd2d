"""SqueezeLLM: weighted 1-D k-means per row, the dense-and-sparse split, and the stage end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compresslab.errors import ConfigError
from compresslab.quantizer.squeezellm import SqueezeLLM, select_outliers, squeezellm_quantize, weighted_kmeans_rows
from conftest import needs_data

ROOT = Path(__file__).resolve().parents[2]


def test_kmeans_is_a_lloyd_fixed_point():
    """Each value goes to its nearest centroid and each centroid is the weighted mean of its values
    (checked element by element here, not with the implementation's vector ops)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 40, generator=g, dtype=torch.float64).float()
    F = torch.rand(3, 40, generator=g).pow(3)
    C, codes = weighted_kmeans_rows(W, F, 4, iters=200)
    for i in range(3):
        assert all(C[i, a] <= C[i, a + 1] for a in range(3))
        for j in range(40):
            dist = [abs(float(W[i, j] - C[i, a])) for a in range(4)]
            assert dist[int(codes[i, j])] <= min(dist) + 1e-6
        for a in range(4):
            members = [j for j in range(40) if int(codes[i, j]) == a]
            mass = sum(float(F[i, j]) for j in members)
            if mass > 0:
                mean = sum(float(F[i, j] * W[i, j]) for j in members) / mass
                assert float(C[i, a]) == pytest.approx(mean, rel=1e-4, abs=1e-6)


def test_kmeans_reproduces_rows_with_few_distinct_values_and_follows_the_weights():
    W = torch.tensor([[0.5, -1.0, 0.5, 2.0, -1.0, 2.0, 3.0, 3.0]])
    C, codes = weighted_kmeans_rows(W, torch.ones_like(W), 4)
    assert torch.equal(C.gather(1, codes), W)  # four distinct values, four centroids: exact
    # two centroids for four values: the heavy value keeps a centroid of its own
    W2 = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    C2, codes2 = weighted_kmeans_rows(W2, torch.tensor([[1.0, 1.0, 1.0, 100.0]]), 2)
    assert float(C2.gather(1, codes2)[0, 3]) == 10.0 and float(C2[0, 0]) == pytest.approx(1.0)


def test_outlier_selection_by_magnitude_and_by_sensitivity():
    W = torch.arange(-50, 50, dtype=torch.float32).reshape(4, 25)
    F = torch.zeros(4, 25)
    F[2, 3] = 9.0  # the one sensitive weight
    keep = torch.ones(4, 25, dtype=torch.bool)
    keep[0, 0] = False  # -50: pruned, never an outlier
    out = select_outliers(W, F, keep, 0.02, 0.01)  # 2 by |w|, 1 by F
    assert {tuple(p) for p in out.nonzero().tolist()} == {(3, 24), (0, 1), (2, 3)}  # |49| and |-49| (|-50| is pruned)


def test_quantize_beats_unweighted_in_the_fisher_norm_and_keeps_outliers_and_mask():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 64, generator=g)
    W[3, 7] = 25.0  # an outlier
    F = torch.rand(16, 64, generator=g).pow(6) * 10
    keep = torch.rand(16, 64, generator=g) > 0.3
    W_hat, lw, sparse = squeezellm_quantize(W, F, 3, keep, outlier_fraction=0.002)
    assert sparse[3, 7] and float(W_hat[3, 7]) == 25.0  # exact (fp16-representable)
    assert not bool(W_hat[~keep].any())  # pruned stay 0
    codes = lw.encode(W_hat).codes.long()
    on_table = lw.lut.gather(1, codes)
    assert torch.equal(W_hat[keep & ~sparse], on_table[keep & ~sparse])  # everything else on its row's table
    assert lw.lut.shape == (16, 8)
    W_u, _, _ = squeezellm_quantize(W, torch.ones_like(F), 3, keep, outlier_fraction=0.002)
    fisher_err = lambda Wh: float((F * (W - Wh).square() * keep).sum())  # noqa: E731
    assert fisher_err(W_hat) < 0.8 * fisher_err(W_u)


def test_bad_options_fail_at_once():
    for kw in ({"outlier_fraction": 0.7}, {"sensitive_fraction": -0.1}, {"iters": 0}, {"bits": 1}):
        with pytest.raises(ConfigError):
            SqueezeLLM(**kw)


@needs_data
def test_cli_avg_bits_counts_codes_tables_and_outliers(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "quantizer=squeezellm", "quantizer.bits=3",
         "quantizer.outlier_fraction=0.01", "quantizer.sensitive_fraction=0", "data.nsamples=4", "data.seqlen=32",
         "eval.seqlen=128", "eval.max_windows=2", "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "metrics.json").read_text())
    for row in rec["layers"]:
        o, i = row["shape"]
        nnz = int(0.01 * o * i)
        col_bits = 16 if i <= 32767 else 32
        bits = 3 * o * i + 16 * 8 * o + nnz * (16 + col_bits) + 32 * (o + 1)  # codes, tables, CSR
        # codes are packed into int32 words: round up to a whole word
        bits += (-3 * o * i) % 32
        assert row["avg_bits"] == pytest.approx(bits / (o * i), rel=1e-9), row["name"]
        assert row["outliers"] == pytest.approx(nnz / (o * i))


def test_recovery_keeps_table_layers_frozen():
    """A table (or outlier) layer has no uniform grid to train on: recovery's latent weight stays frozen."""
    from torch import nn

    from compresslab.recovery.ste import ConstrainedLinear
    from compresslab.stats import LayerStats

    lin = nn.Linear(32, 8, bias=False)
    stats = LayerStats({"fisher"}, 32)
    stats.add_batch(torch.randn(4, 32))
    stats.attach_fisher({"l": torch.rand(8, 32)})
    SqueezeLLM(bits=3).compress("l", lin, stats)
    c = ConstrainedLinear(lin, "all", False)
    assert not c.train_weight and not c.W.requires_grad and c.qw is None
    plain = nn.Linear(32, 8, bias=False)
    assert ConstrainedLinear(plain, "all", False).train_weight  # an uncompressed layer does train
