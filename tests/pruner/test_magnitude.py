import pytest
import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.pruner.magnitude import Magnitude, magnitude_mask
from compresslab.pruner.masks import keep_mask, parse_pattern


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_is_exact(n, m):
    W = torch.randn(16, 64)
    mask = magnitude_mask(W, 1 - n / m, (n, m))
    groups = mask.reshape(16, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the n largest |w| of each group (brute force)
    a = W.abs().reshape(16, 64 // m, m)
    for r in range(16):
        for g in range(64 // m):
            kept = set(torch.nonzero(groups[r, g]).flatten().tolist())
            top = set(a[r, g].argsort(descending=True)[:n].tolist())
            assert kept == top


def test_unstructured_is_rowwise_and_keeps_largest():
    W = torch.randn(8, 50)
    mask = magnitude_mask(W, 0.3)
    assert (mask.sum(1) == 50 - 15).all()
    for r in range(8):
        dropped = W[r].abs()[~mask[r]]
        kept = W[r].abs()[mask[r]]
        assert dropped.max() <= kept.min()


def test_layer_is_pruned_in_place_and_pattern_recorded():
    lin = nn.Linear(32, 8, bias=False)
    before = lin.weight.detach().clone()
    Magnitude(0.5, "2:4").compress("l", lin, None)
    w = lin.weight.detach()
    assert ((w.reshape(8, 8, 4) != 0).sum(-1) <= 2).all()
    assert torch.equal(w[w != 0], before[w != 0])
    assert lin.compresslab_state.pattern == "2:4"


def test_zero_sparsity_is_identity():
    scores = torch.rand(4, 12)
    assert keep_mask(scores, 0.0, None).all()


@pytest.mark.parametrize("bad", ["2:2", "4:2", "0:4", "2-4", "abc"])
def test_bad_pattern(bad):
    with pytest.raises(ConfigError, match="pruner.pattern"):
        parse_pattern(bad)


def test_bad_sparsity_and_conflicts():
    with pytest.raises(ConfigError, match="out of range"):
        Magnitude(1.2)
    with pytest.raises(ConfigError, match="conflicts with pruner.pattern=1:4"):
        Magnitude(0.5, "1:4")


def test_nm_on_indivisible_width_names_layer():
    with pytest.raises(ConfigError, match=r"multiple of 4.*blk\.fc has 30"):
        Magnitude(0.5, "2:4").check("blk.fc", nn.Linear(30, 4))
