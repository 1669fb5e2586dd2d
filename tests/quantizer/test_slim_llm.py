import pytest
import torch

from compresslab.engine import SequentialEngine
from compresslab.metrics import compression_summary
from compresslab.models.loaders import TinyModel
from compresslab.obs import GridSpec, obs_compress
from compresslab.quantizer import grid
from compresslab.quantizer.slim_llm import SliMLLM, group_salience, hinv_diag, sba_bit_map, sqc_params
from compresslab.quantizer.slim_llm_plus import SliMLLMPlus
from compresslab.stages import layer_state
from tests.conftest import correlated_inputs, hessian_of, out_err


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_sba_average_is_exact_and_most_salient_gets_more(bits, k):
    sal = torch.rand(9)
    bm = sba_bit_map(sal, bits, k)
    assert bm.float().mean().item() == bits  # exact: 9 groups, k up, k down
    assert set(bm.tolist()) <= {bits - 1, bits, bits + 1}
    if k:
        assert bm[sal.argmax()] == bits + 1 and bm[sal.argmin()] == bits - 1


def planted_layer(d=256, out=64, g=32):
    X = correlated_inputs(2048, d, seed=3)
    W = torch.randn(out, d) * 0.5
    W[:, 64:96] *= 6.0  # one group of planted salient columns
    return W, X, hessian_of(X), g


def test_sba_beats_uniform_gptq_at_same_average_bits():
    W, X, H, g = planted_layer()
    sal = group_salience(W, hinv_diag(H, 0.01), g)
    assert set(sal.topk(2).indices.tolist()) == {0, 2}  # planted columns (group 2), outlier inputs (group 0)
    bm = sba_bit_map(sal, 2, 2)
    W_u, q_u, _ = obs_compress(W, H, quant=GridSpec(2, g))
    W_m, q_m, _ = obs_compress(W, H, quant=GridSpec(2, g, bit_map=bm))
    assert q_m.code_bits() == q_u.code_bits()  # same average bits
    assert out_err(W, W_m, X) < 0.9 * out_err(W, W_u, X)
    assert torch.allclose(q_m.encode(W_m).dequantize(), W_m, atol=1e-5)  # each group on its own grid


def brute_sqc(Wg, sal, bits, lam):
    z = (sal - sal.mean(1, keepdim=True)) / sal.std(1, keepdim=True)
    om = torch.where(z.abs() > 2, lam, 1.0)
    best = []
    for r in range(Wg.shape[0]):
        errs = []
        for f in torch.linspace(0.9, 1.1, 101):
            s, zz = grid.qparams(Wg[r].min() * f, Wg[r].max() * f, bits, False)
            q = grid.fake_quantize(Wg[r], s, zz, 2**bits - 1)
            errs.append(float(((Wg[r] - q).abs().pow(2.4) * om[r]).sum()))
        best.append(int(torch.tensor(errs).argmin()))
    return torch.tensor(best)


def test_sqc_finds_the_optimum_and_lambda_matters():
    torch.manual_seed(1)
    Wg = torch.randn(16, 64)
    sal = torch.rand(16, 64)
    sal[:, :3] = 50.0  # planted salient elements
    Wg[:, :3] = 2.9  # ... sitting near the range edge
    factors = torch.linspace(0.9, 1.1, 101)
    picks = {}
    for lam in (1.0, 20.0):
        s, z = sqc_params(Wg, sal, 2, lam=lam)
        ref = brute_sqc(Wg, sal, 2, lam)
        s_ref, _ = grid.qparams(Wg.amin(1) * factors[ref], Wg.amax(1) * factors[ref], 2, False)
        torch.testing.assert_close(s, s_ref)
        picks[lam] = s
    assert not torch.equal(picks[1.0], picks[20.0])  # λ ≠ 1 changes the choice


def test_avg_bits_counts_the_bit_map_exactly():
    model, _ = TinyModel("llama", hidden_size=64, intermediate_size=128, num_layers=1).load()
    ids = torch.randint(0, 200, (4, 32))
    SequentialEngine("cpu", progress=False).run(model, ids, [SliMLLM(bits=2, group_size=16, sba_grid=[0.25])])
    summary, rows = compression_summary(model)
    total = 0
    for row in rows:
        out, inp = row["shape"]
        C = inp // 16
        bm = [1] * (C // 4) + [3] * (C // 4) + [2] * (C - 2 * (C // 4))
        total += out * 16 * sum(bm) + out * C * 16 + out * sum(bm) + 8 * C  # codes, fp16 scales, zeros, map
    assert summary["avg_bits"] == pytest.approx(total / sum(r["shape"][0] * r["shape"][1] for r in rows))


def test_lwc_reduces_block_mse():
    model, _ = TinyModel("llama", hidden_size=64, intermediate_size=128, num_layers=2).load()
    ids = torch.randint(0, 200, (8, 32))
    q = SliMLLMPlus(bits=2, group_size=16, epochs=8, lr=1e-2, nsamples=8, batch_size=4)
    res = SequentialEngine("cpu", progress=False).run(model, ids, [q])
    assert len(res["blocks"]) == 2
    for rep in res["blocks"]:
        assert rep["lwc_mse_after"] < rep["lwc_mse_before"]
    lin = model.model.layers[0].mlp.down_proj
    qw = layer_state(lin).quant
    assert qw.bit_map is not None and not layer_state(lin).pending_lwc
    torch.testing.assert_close(qw.encode(lin.weight.data).dequantize(), lin.weight.data, atol=1e-5, rtol=0)


def test_kl_search_moves_bits_to_the_planted_group():
    from torch import nn

    from compresslab.stats import LayerStats

    W, X, H, g = planted_layer()
    stats = LayerStats({"hessian", "input_sample"}, W.shape[1])
    stats.add_batch(X)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    SliMLLM(bits=2, group_size=g, sqc=False).compress("l", lin, stats)
    bm = layer_state(lin).quant.bit_map
    assert bm.float().mean() == 2 and bm[2] == 3  # the planted salient group got b+1
