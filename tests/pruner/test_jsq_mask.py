import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compresslab.errors import ConfigError
from compresslab.pruner.jsq import JSQ, range_salience
from compresslab.pruner.mask import MaskFile
from compresslab.stats import LayerStats, clip_top


def test_range_salience_matches_brute_force():
    X = torch.randn(7, 6)
    W = torch.randn(4, 6)
    A = range_salience(X, W, max_elems=50)  # forces several chunks
    for o in range(4):
        for j in range(6):
            Wj = W.clone()
            Wj[:, j] = 0
            y = X @ Wj[o]
            assert abs(A[o, j].item() - (y.max() - y.min()).item()) < 1e-5


def test_clip_top_clamps_one_percent():
    x = torch.randn(10_000)
    c = clip_top(x, 0.01)
    assert (c.abs() < x.abs()).sum() <= 100 and torch.allclose(c.abs().max(), x.abs().sort().values[-100])


def jsq_reference(W, batches, rho):
    """JSQ's score from its definition, written without stats.py/jsq.py: per batch, clamp |x| at the
    k-th largest |x| of the batch (k = 1% of its entries); ‖X̃_j‖₂ over all tokens; X̄ the mean over
    samples of the clipped (T, d) sequences; A[o, j] = range over t of Σ_{k≠j} X̄[t, k]·W[o, k]."""
    clipped = []
    for X in batches:
        k = int(0.01 * X.numel())
        t = X.abs().flatten().sort(descending=True).values[k - 1]
        clipped.append(X.clamp(-t, t))
    Xc = torch.cat(clipped)  # (samples, T, d)
    norm = Xc.square().sum((0, 1)).sqrt()
    mean = Xc.mean(0)  # (T, d)
    out, d = W.shape
    A = torch.zeros(out, d)
    for o in range(out):
        for j in range(d):
            keep = torch.ones(d, dtype=torch.bool)
            keep[j] = False
            y = mean[:, keep] @ W[o, keep]
            A[o, j] = y.max() - y.min()
    return W.abs() * norm[None, :] + rho * A


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_jsq_score_and_mask_match_the_definition(pattern):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 12, 16, generator=g) * (1 + 5 * (torch.rand(16, generator=g) > 0.9)) for _ in range(2)]
    W = torch.randn(6, 16, generator=g)
    stats = LayerStats({"jsq"}, 16)
    for X in batches:
        stats.add_batch(X)
    pruner = JSQ(0.5, pattern, rho=2.1)
    ref = jsq_reference(W, batches, 2.1)
    torch.testing.assert_close(pruner.scores("l", W, stats), ref, rtol=1e-4, atol=1e-4)
    _, keep = pruner.prune("l", W, stats)
    if pattern == "2:4":  # the 2 highest reference scores of every group of 4 are kept
        top = ref.reshape(6, 4, 4).topk(2, dim=-1).indices
        expect = torch.zeros(6, 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(6, 16)
    else:  # the 8 highest of each row
        expect = torch.zeros(6, 16, dtype=torch.bool).scatter_(1, ref.topk(8, dim=1).indices, True)
    assert torch.equal(keep.bool(), expect)


def test_jsq_prunes_to_pattern():
    X = torch.randn(3, 16, 32)
    stats = LayerStats({"jsq"}, 32)
    stats.add_batch(X)
    W = torch.randn(8, 32)
    W_hat, keep = JSQ(0.5, "2:4").prune("l", W, stats)
    assert int(keep.sum()) == W.numel() // 2
    torch.testing.assert_close(stats.jsq_mean, clip_top(X, 0.01).mean(0))


def test_mask_file_applies_and_verifies(tmp_path):
    lin = nn.Linear(8, 4, bias=False)
    good = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]] * 4, dtype=torch.bool)
    save_file({"blk.0.lin.mask": good.to(torch.uint8)}, str(tmp_path / "m.safetensors"))
    pr = MaskFile(str(tmp_path / "m.safetensors"), "2:4")
    pr.check("blk.0.lin", lin)
    pr.compress("blk.0.lin", lin)
    assert torch.equal(lin.weight.data != 0, good)
    with pytest.raises(ConfigError, match="no mask for"):
        pr.check("blk.1.lin", lin)
    bad = good.clone()
    bad[0, 2] = True
    save_file({"blk.0.lin": bad.to(torch.uint8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="is not 2:4"):
        MaskFile(str(tmp_path / "bad.safetensors"), "2:4").compress("blk.0.lin", lin)
    with pytest.raises(ConfigError, match="does not exist"):
        MaskFile(str(tmp_path / "nope.safetensors"))
