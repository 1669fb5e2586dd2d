import itertools

import pytest
import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.format import QuantizedWeight
from compresslab.quantizer.rtn import RTN, rtn_quantize


def brute_force_rtn(w: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Nearest point of the grid {s·(q − z)} for one group, found by trying every level."""
    maxq = 2**bits - 1
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    if symmetric:
        hi = max(-lo, hi)
        lo = -hi if lo < 0 else lo
    s = float(torch.tensor((hi - lo) / maxq).half())  # scales are fp16 values (stored as fp16)
    z = (maxq + 1) / 2 if symmetric else round(-lo / s)
    levels = torch.tensor([s * (q - z) for q in range(maxq + 1)], dtype=torch.float64)
    return levels[(w.double()[:, None] - levels[None]).abs().argmin(1)].float()


@pytest.mark.parametrize("bits,symmetric", itertools.product([2, 3, 4, 8], [False, True]))
def test_rtn_matches_brute_force_nearest_level(bits, symmetric):
    W = torch.randn(4, 64)
    deq = rtn_quantize(W, bits, group_size=16, symmetric=symmetric).dequantize()
    for r in range(4):
        for g in range(4):
            w = W[r, g * 16 : (g + 1) * 16]
            ref = brute_force_rtn(w, bits, symmetric)
            # same distance to the grid (exact ties may round either way)
            torch.testing.assert_close((deq[r, g * 16 : (g + 1) * 16] - w).abs(), (ref - w).abs(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity,group_size", [("row", 32), ("row", -1), ("column", -1), ("tensor", -1)])
@pytest.mark.parametrize("bits", [2, 4])
def test_weights_lie_on_grid(granularity, group_size, bits):
    W = torch.randn(8, 64) * torch.linspace(0.1, 3, 64)
    qw = rtn_quantize(W, bits, group_size, granularity=granularity)
    deq = qw.dequantize()
    # at most 2^bits levels per group
    if granularity == "column":
        groups = deq.T
    elif granularity == "tensor":
        groups = deq.reshape(1, -1)
    else:
        groups = deq.reshape(8 * (64 // (group_size if group_size > 0 else 64)), -1)
    for grp in groups:
        assert grp.unique().numel() <= 2**bits
    # re-encoding the dequantized weight gives back the same codes (it is on the grid)
    assert torch.equal(qw.encode(deq).codes, qw.codes)
    # rounding error is at most half a step
    step = qw.expand(qw.scales)
    assert ((W - deq).abs() <= step / 2 + 1e-6).all()


def test_pruned_zeros_stay_exactly_zero():
    lin = nn.Linear(64, 16, bias=False)
    Magnitude(0.5, "2:4").compress("l", lin, None)
    zeros = lin.weight == 0
    for bits in (2, 3, 4):
        RTN(bits=bits, group_size=16).compress("l", lin, None)
        assert (lin.weight[zeros] == 0).all()
    RTN(bits=3, symmetric=True).compress("l", lin, None)
    assert (lin.weight[zeros] == 0).all()


def test_w8_is_nearly_lossless_and_w2_is_not():
    W = torch.randn(64, 128)
    e8 = (rtn_quantize(W, 8, 64).dequantize() - W).norm() / W.norm()
    e2 = (rtn_quantize(W, 2, 64).dequantize() - W).norm() / W.norm()
    assert e8 < 0.01 < 0.2 < e2


def test_storage_bits():
    W = torch.randn(8, 128)
    assert rtn_quantize(W, 4, 64).avg_bits() == pytest.approx(4 + (16 + 4) / 64)
    assert rtn_quantize(W, 4, 64, symmetric=True).avg_bits() == pytest.approx(4 + 16 / 64)
    assert rtn_quantize(W, 3, -1).avg_bits() == pytest.approx(3 + (16 + 3) / 128)


def test_group_size_must_divide_width():
    with pytest.raises(ConfigError, match=r"does not divide the input width 576 of model\.layers\.0\.q.*64"):
        RTN(bits=4, group_size=128).check("model.layers.0.q", nn.Linear(576, 8))


@pytest.mark.parametrize("bits", [1, 9, 0, 4.5])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="quantizer.bits"):
        RTN(bits=bits)


def test_granularity_needs_per_channel():
    with pytest.raises(ConfigError, match="granularity"):
        RTN(bits=4, group_size=64, granularity="tensor")
    with pytest.raises(ConfigError, match="granularity"):
        RTN(bits=4, granularity="block")


def test_format_roundtrip_without_codes():
    W = torch.randn(6, 32)
    qw = rtn_quantize(W, 3, 8)
    deq = qw.dequantize()
    again = qw.without_codes().encode(deq)
    assert isinstance(again, QuantizedWeight)
    assert torch.equal(again.codes, qw.codes)
