import logging

import pytest
import torch

from compresslab.errors import ConfigError
from compresslab.obs import inverse_hessian_upper
from compresslab.quantizer.gptq import GPTQ, gptq_quantize
from compresslab.quantizer.rtn import rtn_quantize
from tests.conftest import correlated_inputs, hessian_of, out_err


def on_grid(W_hat, qw):
    return torch.allclose(qw.encode(W_hat).dequantize(), W_hat, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptq_beats_rtn(bits, act_order, group_size):
    X = correlated_inputs(1024, 128)
    W = torch.randn(48, 128)
    W_g, qw = gptq_quantize(W, hessian_of(X), bits, group_size, act_order=act_order,
                            static_groups=act_order and group_size > 0, blocksize=32)
    W_r = rtn_quantize(W, bits, group_size).dequantize()
    assert on_grid(W_g, qw)
    assert len(torch.unique(qw.encode(W_g).codes)) <= 2**bits
    assert out_err(W, W_g, X) < out_err(W, W_r, X)


def test_static_groups_keep_group_boundaries_under_act_order():
    X = correlated_inputs(512, 64)
    W = torch.randn(16, 64)
    H = hessian_of(X)
    _, q_plain = gptq_quantize(W, H, 4, 16, static_groups=True)
    W_ao, q_ao = gptq_quantize(W, H, 4, 16, act_order=True, static_groups=True)
    assert q_ao.group_size == 16 and q_ao.scales.shape == (16, 4)
    torch.testing.assert_close(q_ao.scales, q_plain.scales, rtol=0, atol=0)
    torch.testing.assert_close(q_ao.zeros, q_plain.zeros, rtol=0, atol=0)
    assert on_grid(W_ao, q_ao)  # each column lies on ITS contiguous group's grid


def test_act_order_with_dynamic_groups_is_rejected():
    with pytest.raises(ConfigError, match="static_groups"):
        GPTQ(bits=4, group_size=64, act_order=True, static_groups=False)


def test_cholesky_retry_and_fallback(caplog):
    H = torch.ones(8, 8)  # rank 1: undamped Cholesky fails
    with caplog.at_level(logging.WARNING):
        U = inverse_hessian_upper(H, percdamp=0.0)
    assert torch.isfinite(U).all()
    assert "retrying" in caplog.text or "falling back" in caplog.text
    bad = -torch.eye(8)  # never positive definite: falls back to the diagonal, does not crash
    with caplog.at_level(logging.ERROR):
        U = inverse_hessian_upper(bad, percdamp=0.01)
    assert torch.isfinite(U).all() and "falling back" in caplog.text


def test_gptq_is_deterministic():
    X = correlated_inputs(256, 64)
    W = torch.randn(16, 64)
    a, _ = gptq_quantize(W, hessian_of(X), 3, 16)
    b, _ = gptq_quantize(W, hessian_of(X), 3, 16)
    assert torch.equal(a, b)


def test_gptq_holds_an_existing_mask():
    X = correlated_inputs(256, 64)
    W = torch.randn(16, 64)
    keep = torch.rand(16, 64) > 0.5
    W_hat, qw = gptq_quantize(W * keep, hessian_of(X), 4, 16, keep=keep)
    assert torch.all(W_hat[~keep] == 0) and on_grid(W_hat, qw)
