"""One OBS sweep over Linears that share a Hessian (q/k/v, gate/up) gives what separate sweeps give."""

import copy

import pytest
import torch
from torch import nn

from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ
from compresslab.stages import fuse_stages, layer_state
from compresslab.stats import LayerStats
from tests.conftest import correlated_inputs

STAGES = {
    "gptq": lambda: [GPTQ(bits=3, group_size=32)],
    "gptq_act_order": lambda: [GPTQ(bits=4, group_size=32, act_order=True)],
    "sparsegpt_unstructured": lambda: [SparseGPT(0.5)],
    "sparsegpt_2:4": lambda: [SparseGPT(0.5, "2:4")],
    "joint_unstructured": lambda: fuse_stages([SparseGPT(0.6), GPTQ(bits=3, group_size=32)]),
    "joint_2:4": lambda: fuse_stages([SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=32)]),
    "slim_llm": lambda: [__import__("compresslab.quantizer.slim_llm", fromlist=["SliMLLM"]).SliMLLM(
        bits=3, group_size=32, sba_grid=(0.25,))],  # one candidate: each Linear's own salient groups
    "slim_llm_searched": lambda: [__import__("compresslab.quantizer.slim_llm", fromlist=["SliMLLM"]).SliMLLM(
        bits=3, group_size=32, sba_grid=(0.0, 0.1, 0.25))],
    "slim_llm_no_sba": lambda: [__import__("compresslab.quantizer.slim_llm", fromlist=["SliMLLM"]).SliMLLM(
        bits=2, group_size=32, sba=False)],
    "sparsegpt_2:4_then_slim_llm": lambda: [SparseGPT(0.5, "2:4"), __import__(
        "compresslab.quantizer.slim_llm", fromlist=["SliMLLM"]).SliMLLM(bits=3, group_size=32)],
    "wanda_then_gptq": lambda: [__import__("compresslab.pruner.wanda", fromlist=["Wanda"]).Wanda(0.5),
                                GPTQ(bits=3, group_size=32)],
}


def _layers(d=128, outs=(96, 32, 32), seed=0):
    torch.manual_seed(seed)
    # different scales per Linear, so a shared unstructured threshold would differ from each one's own
    lins = [nn.Linear(d, o, bias=False) for o in outs]
    for k, lin in enumerate(lins):
        lin.weight.data *= 1 + 2 * k
        lin.weight.data[:, 32 * (k + 1):32 * (k + 2)] *= 30  # a salient column group of its own (SBA)
    return [(f"l{k}", lin) for k, lin in enumerate(lins)]


@pytest.mark.parametrize("case", sorted(STAGES))
def test_stacked_sweep_equals_separate_sweeps(case):
    X = correlated_inputs(1024, 128, seed=1)
    stats = LayerStats({"hessian", "act_norm", "input_sample"}, 128)
    stats.add_batch(X)
    sep = _layers()
    stacked = copy.deepcopy(sep)
    for stage in STAGES[case]():
        for name, lin in sep:
            stage.compress(name, lin, stats)
    n_grouped = 0
    for stage in STAGES[case]():
        if hasattr(stage, "compress_group"):
            stage.compress_group(stacked, stats)
            n_grouped += 1
        else:
            for name, lin in stacked:
                stage.compress(name, lin, stats)
    assert n_grouped >= 1
    maps = [layer_state(lin).quant.bit_map for _, lin in sep if layer_state(lin).quant is not None]
    if case == "slim_llm":  # the case must give the Linears different bit maps to test the per-row map
        assert not all(torch.equal(m, maps[0]) for m in maps[1:])
    for (name, a), (_, b) in zip(sep, stacked):
        sa, sb = layer_state(a), layer_state(b)
        if sa.pattern is not None:
            assert torch.equal(sa.mask, sb.mask), name
            assert sb.mask.shape == a.weight.shape
        if sa.quant is not None:  # same grid (and bit map), same codes
            assert (sa.quant.bit_map is None) == (sb.quant.bit_map is None), name
            if sa.quant.bit_map is not None:
                assert torch.equal(sa.quant.bit_map, sb.quant.bit_map), name
            torch.testing.assert_close(sb.quant.scales, sa.quant.scales, rtol=0, atol=0)
            assert torch.equal(sb.quant.encode(b.weight.data).codes, sa.quant.encode(a.weight.data).codes), name
        torch.testing.assert_close(b.weight.data, a.weight.data, rtol=1e-5, atol=1e-6)
        assert [n.damp for n in sb.numerics] == [n.damp for n in sa.numerics]


def _upper_reference(H, damp, dead=None):
    """U with UᵀU = (H + λI)⁻¹, λ = damp·mean(diag), dead columns' diagonal 1: the plain calls, each into a
    new tensor (what the sweep computed before it factorized in place)."""
    A = H.clone()
    if dead is not None:
        A.diagonal().masked_fill_(dead, 1.0)
    A.diagonal().add_(damp * A.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A)), upper=True)


@pytest.mark.parametrize("dead_cols", [(), (3, 70)])
def test_factorization_in_place_is_the_plain_factorization_and_holds_one_matrix(dead_cols, monkeypatch):
    """inverse_hessian_upper overwrites one clone of H through its three LAPACK steps: bitwise the U of the
    plain calls, H untouched, and one (d, d) matrix of its own alive beside H (the plain calls hold two).
    The finiteness check's row-slice temporaries are left out of the count (tested on their own above)."""
    from compresslab import obs
    from compresslab.obs import inverse_hessian_upper
    from tests.conftest import LiveBytes, hessian_of

    d = 192
    H = hessian_of(correlated_inputs(1024, d))
    dead = torch.zeros(d, dtype=torch.bool)
    for j in dead_cols:  # inputs that were always 0
        H[j, :] = 0
        H[:, j] = 0
        dead[j] = True
    before = H.clone()
    monkeypatch.setattr(obs, "_all_finite", lambda U: True)
    with LiveBytes(H) as counted:
        U = inverse_hessian_upper(H, 0.01, dead=dead if dead_cols else None)
    ref = _upper_reference(H, 0.01, dead if dead_cols else None)
    assert torch.equal(U, ref)
    assert torch.equal(H, before)
    assert counted.peak - H.nbytes < 1.1 * H.nbytes


def test_factorization_retry_after_a_failed_in_place_step_starts_from_h():
    """A failed Cholesky leaves the working matrix half overwritten; the next damping starts from H again."""
    from compresslab.obs import inverse_hessian_upper

    x = torch.randn(1, 16, dtype=torch.float64).float()
    H = x.T @ x + 1e-9 * torch.eye(16)  # rank 1: the undamped factorization fails, 1e-4 of mean diag does not
    numerics = []
    U = inverse_hessian_upper(H, 0.0, numerics=numerics)
    assert numerics[0].retries >= 1 and not numerics[0].fallback
    assert torch.equal(U, _upper_reference(H, numerics[0].damp))


@pytest.mark.parametrize("prune", [False, True])
def test_overwrite_works_in_the_callers_weight_with_the_same_result(prune):
    """obs_compress(..., overwrite=True) (what a stacked sweep asks for: its W is a fresh copy) returns W_hat
    in W's own storage, with the codes and mask of the copying call."""
    from compresslab.obs import GridSpec, PruneSpec, obs_compress
    from tests.conftest import hessian_of

    X = correlated_inputs(512, 64)
    H = hessian_of(X)
    W = torch.randn(48, 64)
    kw = dict(quant=GridSpec(4, 32, "asym", False), prune=PruneSpec(0.5, (2, 4)) if prune else None, blocksize=32)
    ref, qref, kref = obs_compress(W, H, **kw)
    mine = W.clone()
    W_hat, qw, keep = obs_compress(mine, H, overwrite=True, **kw)
    assert W_hat.data_ptr() == mine.data_ptr()
    assert torch.equal(W_hat, ref) and torch.equal(keep, kref) and torch.equal(qw.codes, qref.codes)
    W_copy, _, _ = obs_compress(W, H, **kw)
    assert W_copy.data_ptr() != W.data_ptr() and not torch.equal(W, ref)  # the default leaves W as it was
