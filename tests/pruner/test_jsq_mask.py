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
