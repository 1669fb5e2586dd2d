import pytest
import torch

from compresslab.pruner.magnitude import magnitude_mask
from compresslab.pruner.masks import nm_valid
from compresslab.pruner.sparsegpt import sparsegpt_prune
from compresslab.pruner.wanda import wanda_scores
from compresslab.pruner.masks import keep_mask
from tests.conftest import correlated_inputs, hessian_of, out_err


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern):
    X = correlated_inputs(1024, 128)
    W = torch.randn(64, 128)
    H = hessian_of(X)
    W_sg, keep, _ = sparsegpt_prune(W, H, 0.5, pattern, blocksize=32)
    W_mag = W * magnitude_mask(W, 0.5, pattern)
    W_wanda = W * keep_mask(wanda_scores(W, X.norm(dim=0)), 0.5, pattern)
    e_sg, e_mag, e_wanda = out_err(W, W_sg, X), out_err(W, W_mag, X), out_err(W, W_wanda, X)
    assert e_sg < 0.9 * min(e_wanda, e_mag), (e_sg, e_wanda, e_mag)
    assert torch.equal(W_sg != 0, keep)
    if pattern:
        assert nm_valid(W_sg != 0, pattern) and int((W_sg != 0).sum()) == W.numel() // 2
    else:
        assert abs((W_sg == 0).float().mean().item() - 0.5) < 0.01


def test_dead_columns_are_zeroed():
    X = correlated_inputs(256, 32)
    X[:, 3] = 0
    W = torch.randn(8, 32)
    W_hat, _, _ = sparsegpt_prune(W, hessian_of(X), 0.5, (2, 4))
    assert torch.all(W_hat[:, 3] == 0) and torch.isfinite(W_hat).all()
