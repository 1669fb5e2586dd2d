"""FWSVD: the row-weighted truncation against an independently computed optimum, and the stage."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compresslab.lowrank.fwsvd import FWSVD, row_weighted_svd
from compresslab.lowrank.naive import NaiveSVD
from compresslab.metrics import layer_params
from compresslab.stages import effective_weight, layer_state
from compresslab.stats import LayerStats
from conftest import needs_data

ROOT = Path(__file__).resolve().parents[2]


def skewed(out=24, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(out, inp, generator=g, dtype=torch.float64)
    imp = torch.rand(out, generator=g, dtype=torch.float64) ** 4 * 100  # a few rows matter far more
    return E, imp


@pytest.mark.parametrize("r", [1, 5, 12])
def test_weighted_error_is_the_eckart_young_optimum(r):
    """‖D(E − BA)‖²_F equals the sum of the out − r smallest eigenvalues of (DE)(DE)ᵀ (eigvalsh, not SVD)."""
    E, imp = skewed()
    B, A = row_weighted_svd(E, r, imp)
    D = imp.sqrt()[:, None]
    got = float((D * (E - B.double() @ A.double())).square().sum())
    lam = torch.linalg.eigvalsh((D * E) @ (D * E).T)  # ascending
    want = float(lam[: E.shape[0] - r].sum())
    assert got == pytest.approx(want, rel=1e-4)
    assert B.shape == (24, r) and A.shape == (r, 40)


def test_weighting_beats_plain_svd_in_the_fisher_norm_and_loses_in_the_plain_one():
    E, imp = skewed()
    r = 5
    B, A = row_weighted_svd(E, r, imp)
    U, S, Vh = torch.linalg.svd(E)
    plain = (U[:, :r] * S[:r]) @ Vh[:r]
    D = imp.sqrt()[:, None]
    fw = B.double() @ A.double()
    assert (D * (E - fw)).norm() < 0.9 * (D * (E - plain)).norm()
    assert (E - fw).norm() > (E - plain).norm()  # Eckart–Young: plain SVD is optimal unweighted
    # uniform importance is plain SVD
    B1, A1 = row_weighted_svd(E, r, torch.ones(24, dtype=torch.float64))
    torch.testing.assert_close(B1.double() @ A1.double(), plain, atol=1e-5, rtol=1e-5)


def _stats(lin, F, d):
    stats = LayerStats({"fisher"}, d)
    stats.add_batch(torch.randn(8, d))
    stats.attach_fisher({"blk.l": F})
    return stats


def test_stage_as_replacement_and_as_compensation():
    torch.manual_seed(0)
    d, out = 32, 24
    lin = nn.Linear(d, out, bias=False)
    W0 = lin.weight.detach().clone()
    F = torch.rand(out, d) ** 4
    FWSVD(rank=None, rank_ratio=None, param_ratio=0.5).compress("blk.l", lin, _stats(lin, F, d))
    r = int(0.5 * out * d / (out + d))
    assert layer_state(lin).adapter.replaces and layer_params(lin) == r * (out + d)
    B, A = row_weighted_svd(W0, r, F.sum(1))
    torch.testing.assert_close(lin.weight.detach(), B @ A, atol=1e-5, rtol=1e-5)
    # compensation of a rounding error: the Fisher-weighted error falls, and the full rank restores W
    lin2 = nn.Linear(d, out, bias=False)
    lin2.weight.data.copy_(W0)
    layer_state(lin2, create=True).original = W0.clone()
    from compresslab.quantizer.rtn import RTN

    RTN(bits=2, group_size=32).compress("blk.l", lin2, None)
    C = lin2.weight.detach().clone()
    FWSVD(rank=24).compress("blk.l", lin2, _stats(lin2, F, d))
    torch.testing.assert_close(effective_weight(lin2), W0, atol=1e-4, rtol=1e-4)
    assert not torch.equal(C, W0)


def test_fisher_row_importance_beats_naive_svd_in_the_weighted_norm():
    torch.manual_seed(1)
    d, out = 32, 24
    W0 = torch.randn(out, d)
    F = torch.rand(out, 1) ** 4 * torch.rand(out, d)  # some rows far more sensitive than others
    errs = {}
    for method in (FWSVD, NaiveSVD):
        lin = nn.Linear(d, out, bias=False)
        lin.weight.data.copy_(W0)
        method(rank=4).compress("blk.l", lin, _stats(lin, F, d))
        errs[method] = float((F.sum(1).sqrt()[:, None] * (W0 - lin.weight.detach())).norm())
    assert errs[FWSVD] < 0.9 * errs[NaiveSVD], errs


@needs_data
def test_fwsvd_runs_from_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "lowrank=fwsvd", "lowrank.param_ratio=0.8", "data.nsamples=4",
         "data.seqlen=32", "eval.seqlen=128", "eval.max_windows=2", "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "ok"
    assert m["metrics"]["avg_bits"] == pytest.approx(0.8 * 16, rel=0.05)
