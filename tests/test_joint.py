import pytest
import torch
from torch import nn

from compresslab.engine import SequentialEngine
from compresslab.models.loaders import TinyModel
from compresslab.pruner.masks import nm_valid
from compresslab.pruner.sparsegpt import JointSparseGPTQ, SparseGPT
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.gptq import GPTQ
from compresslab.quantizer.slim_llm import SliMLLM
from compresslab.quantizer.slim_quant import SLiMQuant
from compresslab.stages import fuse_stages, layer_state
from compresslab.stats import LayerStats
from tests.conftest import correlated_inputs


def _stats(X):
    s = LayerStats({"hessian", "act_norm"}, X.shape[1])
    s.add_batch(X)
    return s


def test_joint_sparsegpt_gptq_is_24_and_on_grid():
    X = correlated_inputs(512, 128)
    lin = nn.Linear(128, 32, bias=False)
    stages = fuse_stages([SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=32)])
    assert len(stages) == 1 and isinstance(stages[0], JointSparseGPTQ)
    stages[0].compress("l", lin, _stats(X))
    W = lin.weight.data
    qw = layer_state(lin).quant
    # 2:4 holds; a kept weight may also round to 0, so at most half are non-zero
    assert nm_valid(W != 0, (2, 4)) and W.numel() * 0.48 < int((W != 0).sum()) <= W.numel() // 2
    torch.testing.assert_close(qw.encode(W).dequantize(), W, atol=1e-6, rtol=0)
    for r in range(32):
        for g in range(4):
            assert len(torch.unique(qw.encode(W).codes[r, g * 32:(g + 1) * 32])) <= 16


@pytest.mark.parametrize("quantizer", [GPTQ(bits=3, group_size=32), SLiMQuant(bits=4, group_size=32),
                                       SliMLLM(bits=2, group_size=32)])
def test_prune_then_quantize_holds_the_mask(quantizer):
    X = correlated_inputs(512, 128)
    lin = nn.Linear(128, 16, bias=False)
    stats = LayerStats({"hessian", "act_norm", "input_sample"}, X.shape[1])
    stats.add_batch(X)
    Wanda(0.5, "2:4").compress("l", lin, stats)
    mask = lin.weight.data != 0
    quantizer.compress("l", lin, stats)
    assert torch.equal(lin.weight.data != 0, mask) or torch.all(lin.weight.data[~mask] == 0)
    assert nm_valid(lin.weight.data != 0, (2, 4))


def test_engine_runs_joint_and_reports_layer_error():
    model, _ = TinyModel("llama", hidden_size=64, intermediate_size=128, num_layers=2).load()
    ids = torch.randint(0, 200, (4, 32))
    SequentialEngine("cpu", progress=False).run(model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=32)])
    from compresslab.metrics import compression_summary

    summary, rows = compression_summary(model)
    assert all(r["nm_valid"] for r in rows) and 0.5 <= summary["sparsity"] < 0.52
    assert all(0 < r["rel_error"] < 1 for r in rows)


def test_same_seed_same_weights():
    def run():
        model, _ = TinyModel("llama", hidden_size=64, intermediate_size=128, num_layers=2).load()
        ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
        SequentialEngine("cpu", progress=False).run(model, ids, [Wanda(0.5, "2:4"), GPTQ(bits=3, group_size=32)])
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_joint_pass_needs_one_damping_and_one_block_size():
    """SparseGPT+GPTQ is ONE sweep: it uses the shared percdamp/blocksize, and a disagreement fails
    (before the model loads) naming both values, instead of silently dropping the quantizer's."""
    from compresslab.errors import ConfigError
    from compresslab.pipeline import Pipeline
    from tests.test_errors import NoLoad

    fused = fuse_stages([SparseGPT(0.5, "2:4", percdamp=0.05, blocksize=64), GPTQ(bits=4, percdamp=0.05, blocksize=64)])
    assert isinstance(fused[0], JointSparseGPTQ)
    with pytest.raises(ConfigError, match=r"pruner.percdamp=0.01 and quantizer.percdamp=0.1"):
        fuse_stages([SparseGPT(0.5, "2:4"), GPTQ(bits=4, percdamp=0.1)])
    with pytest.raises(ConfigError, match=r"pruner.blocksize=128 and quantizer.blocksize=32"):
        fuse_stages([SparseGPT(0.5, "2:4"), GPTQ(bits=4, blocksize=32)])
    from compresslab.data.calibration import CalibrationData

    p = Pipeline(model=NoLoad(device="cpu"), data=CalibrationData(nsamples=2, seqlen=16), pruner=SparseGPT(0.5, "2:4"),
                 quantizer=GPTQ(bits=4, group_size=32, percdamp=0.1))
    with pytest.raises(ConfigError, match="ONE pass"):
        p.run()
