import pytest
import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.lowrank.asvd import ASVD
from compresslab.lowrank.eora import EoRA
from compresslab.lowrank.l2qer import L2QER
from compresslab.lowrank.naive import NaiveSVD
from compresslab.lowrank.slim import SLiMLoRA
from compresslab.lowrank.svd_llm import SVDLLM
from compresslab.metrics import compression_summary, layer_params, layer_storage_bits
from compresslab.pruner.masks import nm_valid
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.rtn import RTN
from compresslab.stages import effective_weight, layer_state
from compresslab.stats import LayerStats
from tests.conftest import correlated_inputs

METHODS = [NaiveSVD, SLiMLoRA, L2QER, EoRA, SVDLLM, ASVD]


def _setup(d=128, out=64, seed=0):
    torch.manual_seed(seed)
    X = correlated_inputs(2048, d, seed=seed)
    stats = LayerStats({"hessian", "act_norm", "act_absmean"}, d)
    stats.add_batch(X)
    lin = nn.Linear(d, out, bias=False)
    return X, stats, lin


def _compress(method, lin, stats, quantizer=RTN(bits=3, group_size=32), **kw):
    W0 = lin.weight.detach().float().clone()
    layer_state(lin, create=True).original = W0
    if quantizer is not None:
        quantizer.compress("l", lin, stats)
    C = lin.weight.detach().float().clone()
    method(**kw).compress("l", lin, stats)
    layer_state(lin).original = None
    return W0, C


def err(W, W_hat, X):
    return float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())


@pytest.mark.parametrize("method", METHODS)
def test_lowrank_reduces_output_error(method):
    X, stats, lin = _setup()
    W0, C = _compress(method, lin, stats, rank=8)
    assert err(W0, effective_weight(lin), X) < err(W0, C, X)
    assert lin(X[:3]).shape == (3, 64)
    torch.testing.assert_close(lin(X[:5]), X[:5] @ effective_weight(lin).T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [SLiMLoRA, EoRA, SVDLLM])
def test_activation_aware_methods_beat_naive(method):
    X, stats, lin = _setup()
    W0, _ = _compress(NaiveSVD, lin, stats, rank=8)
    e_naive = err(W0, effective_weight(lin), X)
    _, stats, lin = _setup()
    _compress(method, lin, stats, rank=8)  # SLiM with its re-quantization, as configured by default
    assert err(W0, effective_weight(lin), X) < e_naive


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reconstructs_the_error_exactly(method):
    X, stats, lin = _setup(d=32, out=16)
    kw = {"requantize": False} if method is SLiMLoRA else {}
    W0, C = _compress(method, lin, stats, rank=16, **kw)
    torch.testing.assert_close(effective_weight(lin), W0, atol=2e-3, rtol=2e-3)


def test_merge_rules_and_adapter_options():
    X, stats, lin = _setup()
    with pytest.raises(ConfigError, match="off the grid"):
        _compress(SLiMLoRA, lin, stats, rank=8, separate=False)
    with pytest.raises(ConfigError, match="cannot be quantized"):
        SLiMLoRA(rank=8, separate=False, quantize_adapters=True)
    _, stats, lin = _setup()
    W0, _ = _compress(NaiveSVD, lin, stats, quantizer=None, rank=8, separate=False)  # nothing compressed: merged
    assert not hasattr(lin, "lora_A")
    _, stats, lin = _setup()
    _compress(SLiMLoRA, lin, stats, rank=8, quantize_adapters=True, prune_adapters=True, prune_iters=20)
    assert nm_valid(lin.lora_A != 0, (2, 4))
    # 4-bit AbsMax per tile of 128: at most 15 levels per tile of A
    for t in range(lin.lora_A.shape[1] // 128 or 1):
        row = lin.lora_A[0, t * 128:(t + 1) * 128]
        assert len(torch.unique(row)) <= 15


def test_lowrank_only_replaces_the_weight_and_counts_parameters():
    X, stats, lin = _setup(d=128, out=128)
    _compress(SVDLLM, lin, stats, quantizer=None, rank=32)
    st = layer_state(lin)
    assert st.adapter.replaces and layer_params(lin) == 32 * 256
    assert layer_storage_bits(lin) == 32 * 256 * 16
    assert torch.linalg.matrix_rank(lin.weight.detach().float()) <= 32


def test_svd_llm_beats_naive_at_a_20pct_parameter_cut():
    d = 128
    r = int(0.8 * d * d / (2 * d))  # r(in + out) = 0.8·in·out
    X, stats, lin = _setup(d=d, out=d)
    W0, _ = _compress(NaiveSVD, lin, stats, quantizer=None, rank=r)
    e_naive = err(W0, lin.weight.detach(), X)
    _, stats, lin = _setup(d=d, out=d)
    _compress(SVDLLM, lin, stats, quantizer=None, rank=r)
    e_svdllm = err(W0, lin.weight.detach(), X)
    assert e_svdllm < 0.7 * e_naive, (e_svdllm, e_naive)


def test_slim_requantize_holds_grid_and_mask_and_moves_each_weight_closer():
    """SLiM re-quantizes W − BA on the layer's own grid (scales and zeros kept): every weight ends on
    the grid, pruned weights stay 0, and each kept weight is at least as close to its compensated
    target W − BA as C(W) was."""
    from compresslab.quantizer.gptq import GPTQ

    runs = {}
    for requantize in (False, True):
        X, stats, lin = _setup(d=128, out=64)
        W0 = lin.weight.detach().float().clone()
        layer_state(lin, create=True).original = W0
        Wanda(sparsity=0.5, pattern="2:4").compress("l", lin, stats)
        keep = layer_state(lin).mask.clone()
        GPTQ(bits=3, group_size=32).compress("l", lin, stats)
        C = lin.weight.detach().float().clone()
        SLiMLoRA(rank=8, requantize=requantize).compress("l", lin, stats)
        state = layer_state(lin)
        state.original = state.mask = None
        Wq = lin.weight.detach().float()
        BA = (lin.lora_B @ lin.lora_A).float()
        runs[requantize] = err(W0, effective_weight(lin), X)
        if requantize:
            torch.testing.assert_close(state.quant.encode(Wq).dequantize() * keep, Wq)  # on the grid
            assert not Wq[~keep].any()  # the pruning mask holds
            target = (W0 - BA) * keep
            assert ((target - Wq).abs() <= (target - C).abs() + 1e-5).all()
            assert (Wq != C).any()  # it did move some weights
    assert runs[True] <= runs[False]


def test_slim_requantize_never_raises_the_output_error_of_a_gptq_layer():
    """Re-rounding W − BA would discard GPTQ's error shaping; with the Hessian at hand SLiM keeps the
    re-quantized weight only when the output error (through H) goes down."""
    from compresslab.quantizer.gptq import GPTQ

    X, stats, lin = _setup(d=128, out=64)
    W0 = lin.weight.detach().float().clone()
    layer_state(lin, create=True).original = W0
    GPTQ(bits=2, group_size=32).compress("l", lin, stats)
    C = lin.weight.detach().float().clone()
    SLiMLoRA(rank=4).compress("l", lin, stats)
    layer_state(lin).original = None
    BA = (lin.lora_B @ lin.lora_A).float()
    H = stats.hessian
    F_new, F_old = W0 - BA - lin.weight.detach().float(), W0 - BA - C
    assert ((F_new @ H) * F_new).sum() <= ((F_old @ H) * F_old).sum() + 1e-6


def test_merged_adapters_after_a_pruner_are_refused():
    """separate=false would write a dense B·A over the pruned positions: refused before any layer runs
    (fuse_stages, which Pipeline.validate calls before loading) and at the layer."""
    from compresslab.stages import fuse_stages

    with pytest.raises(ConfigError, match="separate=true"):
        fuse_stages([Wanda(0.5, "2:4"), None, NaiveSVD(rank=8, separate=False)])
    fuse_stages([NaiveSVD(rank=8, separate=False)])  # low-rank as compression stays allowed
    X, stats, lin = _setup()
    layer_state(lin, create=True).original = lin.weight.detach().float().clone()
    Wanda(0.5, "2:4").compress("l", lin, stats)
    with pytest.raises(ConfigError, match="separate=true"):
        NaiveSVD(rank=8, separate=False).compress("l", lin, stats)
