import pytest
import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.quantizer.activations import ActQuant, fake_quant_fp8, fake_quant_int
from compresslab.quantizer.awq import awq_quantize
from compresslab.quantizer.rtn import RTN, rtn_quantize
from tests.conftest import correlated_inputs, hessian_of, out_err


def test_awq_beats_rtn_on_outlier_channels():
    X = correlated_inputs(1024, 128)
    W = torch.randn(64, 128)
    W_a, qw, s, alpha = awq_quantize(W, hessian_of(X), X.abs().mean(0), 3, 32)
    W_r = rtn_quantize(W, 3, 32).dequantize()
    assert alpha > 0 and out_err(W, W_a, X) < out_err(W, W_r, X)
    # the stored grid is that of W·diag(s)
    torch.testing.assert_close(qw.encode(W_a * s).dequantize() / s, W_a, atol=1e-5, rtol=1e-5)


def test_fp8_round_trip():
    x = torch.randn(4, 16, 64) * 3
    q = fake_quant_fp8(x)
    ref = (x / (x.abs().max() / 448)).to(torch.float8_e4m3fn).float() * (x.abs().max() / 448)
    torch.testing.assert_close(q, ref)
    rel = ((q - x).abs() / x.abs().clamp_min(1e-3)).median()
    assert rel < 2**-4  # e4m3: 3 mantissa bits, relative step <= 1/16


@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
def test_int_activation_quant_lies_on_its_grid(granularity):
    """Symmetric int4 AbsMax: each unit (token, group of 16 channels, or the whole tensor) is a whole
    multiple, from −7 to 7, of its own step max|x|/7, and the nearest such multiple."""
    x = torch.randn(2, 8, 64)
    q = fake_quant_int(x, 4, granularity, 16)
    if granularity == "token":
        step = x.abs().amax(-1, keepdim=True) / 7
    elif granularity == "group":
        step = x.reshape(2, 8, 4, 16).abs().amax(-1, keepdim=True).expand(2, 8, 4, 16).reshape(2, 8, 64) / 7
    else:
        step = x.abs().max() / 7
    k = q / step
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)  # on the grid
    assert k.abs().max() <= 7 + 1e-4
    torch.testing.assert_close(q, (x / step).round() * step, atol=1e-6, rtol=0)  # the nearest level
    assert len(torch.unique(k.round())) > 8  # not collapsed to a few levels


def test_act_quant_hook_applies_in_forward():
    lin = nn.Linear(64, 8)
    rtn = RTN(bits=8, group_size=-1, act_bits=4, act_granularity="token")
    rtn.compress("l", lin, None)
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), nn.functional.linear(fake_quant_int(x, 4, "token"), lin.weight, lin.bias))


def test_act_quant_errors():
    with pytest.raises(ConfigError, match="FP8"):
        ActQuant(8, "token")
    with pytest.raises(ConfigError, match="act_bits"):
        ActQuant(1)
    with pytest.raises(ConfigError, match="act_group_size"):
        ActQuant(4, "group", 100).check("l", nn.Linear(64, 4))
