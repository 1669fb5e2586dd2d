"""SVD-LLM V2: loss-optimal truncation through XXᵀ = QΛQᵀ, and its per-matrix ratio rule."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compresslab.allocation.svd_llm_v2 import heterogeneous_ranks
from compresslab.errors import ConfigError
from compresslab.lowrank.svd_llm import SVDLLM
from compresslab.lowrank.svd_llm_v2 import SVDLLMv2
from compresslab.stages import layer_state
from compresslab.stats import LayerStats
from conftest import correlated_inputs, needs_data

ROOT = Path(__file__).resolve().parents[2]


def _replace(method, W, X, r):
    stats = LayerStats({"hessian"}, X.shape[1])
    stats.add_batch(X)
    lin = nn.Linear(X.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    method(rank=r, rank_ratio=None, heterogeneous=False).compress("l", lin, stats) if method is SVDLLMv2 else \
        method(rank=r).compress("l", lin, stats)
    return lin.weight.detach().double()


@pytest.mark.parametrize("n", [2048, 40])  # 40 tokens < 64 channels: XXᵀ singular
def test_output_error_is_the_theoretical_minimum(n):
    """‖(W − Ŵ)X‖²_F equals the sum of the squared singular values of WX beyond r (the best any rank-r
    Ŵ can do: WX itself truncated), computed here from WX directly."""
    X = correlated_inputs(n, 64, seed=1).double()
    W = torch.randn(48, 64, dtype=torch.float64)
    r = 12
    W_hat = _replace(SVDLLMv2, W.float(), X.float(), r)
    got = float(((W - W_hat) @ X.T).square().sum())
    s = torch.linalg.svdvals(W @ X.T)
    want = float(s[r:].square().sum())
    assert got == pytest.approx(want, rel=2e-3)
    # SVD-LLM's (damped, float64) Cholesky cannot do better than the minimum (here it reaches it too)
    W_v1 = _replace(SVDLLM, W.float(), X.float(), r)
    assert float(((W - W_v1) @ X.T).square().sum()) >= got * (1 - 1e-4)


def test_ratio_rule_on_a_hand_computed_case():
    """Two 100x100 matrices of one type, param_ratio 0.5 (uniform rank 25), truncation losses e and e³:
    weights 1/log L = 1 and 1/3, removed fractions 2·0.5·(1, 1/3)/(4/3) = 0.75 and 0.25, ranks
    ⌊0.25·10000/200⌋ = 12 and ⌊0.75·10000/200⌋ = 37."""
    def spectrum(L):
        s2 = torch.zeros(100, dtype=torch.float64)
        s2[:25] = 1e4
        s2[25] = L ** 2  # the only energy beyond the uniform rank
        return s2

    spectra = {"b.0.q": (spectrum(math.e), (100, 100)), "b.1.q": (spectrum(math.e ** 3), (100, 100))}
    ranks, uniform = heterogeneous_ranks(spectra, {"b.0.q": "q", "b.1.q": "q"}, 0.5)
    assert uniform == {"b.0.q": 25, "b.1.q": 25}
    assert ranks == {"b.0.q": 12, "b.1.q": 37}


def test_ratio_rule_keeps_the_budget_when_clamping_overspends():
    g = torch.Generator().manual_seed(0)
    spectra, groups = {}, {}
    for i in range(6):  # one matrix loses far more than the others: its share would exceed full rank
        s2 = torch.rand(32, generator=g, dtype=torch.float64).sort(descending=True).values * (1e6 if i == 0 else 10)
        spectra[f"b.{i}.o"] = (s2 + 3.0, (32, 64))
        groups[f"b.{i}.o"] = "o"
    ranks, uniform = heterogeneous_ranks(spectra, groups, 0.3)
    cost = 96
    assert sum(ranks.values()) * cost <= sum(uniform.values()) * cost
    assert all(1 <= r <= 32 for r in ranks.values())
    assert ranks["b.0.o"] > uniform["b.0.o"]  # the lossiest keeps more


def test_options_fail_before_loading():
    with pytest.raises(ConfigError, match="param_ratio"):
        SVDLLMv2(rank_ratio=0.1)  # heterogeneous needs a parameter budget
    with pytest.raises(ConfigError, match="keep one"):
        SVDLLMv2(rank=8, param_ratio=0.8, heterogeneous=False)
    with pytest.raises(ConfigError, match="true or false"):
        SVDLLMv2(param_ratio=0.8, heterogeneous="yes")
    with pytest.raises(ConfigError, match="rule"):
        SVDLLMv2(param_ratio=0.8, rule="best")


@needs_data
def test_cli_allocates_ranks_and_meets_the_budget(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "lowrank=svd_llm_v2", "lowrank.param_ratio=0.8",
         "data.nsamples=8", "data.seqlen=64", "eval.seqlen=128", "eval.max_windows=2", "logger=none",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "metrics.json").read_text())
    saved = yaml.safe_load((tmp_path / "allocation.yaml").read_text())
    ranks = {n: v["rank"] for n, v in saved["levels"].items()}
    rows = {r["name"]: r for r in rec["layers"]}
    assert {n: rows[n]["rank"] for n in ranks} == ranks  # each layer got its allocated rank
    params = sum(r["rank"] * (rows[n]["shape"][0] + rows[n]["shape"][1]) for n, r in rows.items())
    dense = sum(rows[n]["shape"][0] * rows[n]["shape"][1] for n in rows)
    assert params <= 0.8 * dense and rec["metrics"]["allocation/met"] == pytest.approx(params / dense)
    assert len(set(ranks.values())) > 2  # heterogeneous, not one rank per shape


def test_loss_rule_is_the_brute_force_optimum():
    """rule=loss against every rank combination within the budget (three matrices of one shape)."""
    import itertools

    from compresslab.allocation.svd_llm_v2 import loss_optimal_ranks

    g = torch.Generator().manual_seed(4)
    spectra = {f"m{i}": (torch.rand(6, generator=g, dtype=torch.float64).sort(descending=True).values
                         * 10 ** i, (6, 10)) for i in range(3)}
    budget = 9 * 16  # nine ranks of 16 parameters
    got = loss_optimal_ranks(spectra, budget)
    loss = lambda rk: sum(float(spectra[n][0][r:].sum()) for n, r in rk.items())  # noqa: E731
    best = min((dict(zip(spectra, rs)) for rs in itertools.product(range(1, 7), repeat=3)
                if sum(rs) * 16 <= budget), key=loss)
    assert loss(got) == pytest.approx(loss(best)) and sum(got.values()) * 16 <= budget


@needs_data
def test_cli_loss_rule_never_loses_to_uniform_ranks(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "lowrank=svd_llm_v2", "lowrank.param_ratio=0.7",
         "lowrank.rule=loss", "data.nsamples=8", "data.seqlen=64", "eval.seqlen=128", "eval.max_windows=2",
         "logger=none", f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["allocation/error_sum"] <= m["allocation/error_sum_uniform"] and m["allocation/met"] <= 0.7
