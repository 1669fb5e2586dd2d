import itertools

import pytest
import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.format import QuantizedWeight
from compresslab.quantizer.rtn import RTN, rtn_quantize


def grid_levels(w: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """Every value the grid of one group can take, written out from the definitions."""
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    amax = max(-lo, hi)
    fp16 = lambda v: float(torch.tensor(v).half())  # noqa: E731 - scales are fp16 values (stored as fp16)
    if grid == "asym":  # min/max, 2^b levels
        s = fp16((hi - lo) / (2**bits - 1))
        return torch.tensor([s * (q - round(-lo / s)) for q in range(2**bits)], dtype=torch.float64)
    if grid == "sym":  # GPTQ: 2·max/(2^b − 1) steps, codes 0..2^b−1 around 2^(b−1)
        s = fp16(2 * amax / (2**bits - 1))
        return torch.tensor([s * (q - 2 ** (bits - 1)) for q in range(2**bits)], dtype=torch.float64)
    k = 2 ** (bits - 1) - 1  # absmax: max/(2^(b−1) − 1) steps, levels −k..k
    s = fp16(amax / k)
    return torch.tensor([s * q for q in range(-k, k + 1)], dtype=torch.float64)


def brute_force_rtn(w: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """Nearest point of the grid for one group, found by trying every level."""
    levels = grid_levels(w, bits, grid)
    return levels[(w.double()[:, None] - levels[None]).abs().argmin(1)].float()


@pytest.mark.parametrize("bits,grid", itertools.product([2, 3, 4, 8], ["asym", "sym", "absmax"]))
def test_rtn_matches_brute_force_nearest_level(bits, grid):
    W = torch.randn(4, 64)
    deq = rtn_quantize(W, bits, group_size=16, grid=grid).dequantize()
    for r in range(4):
        for g in range(4):
            w = W[r, g * 16 : (g + 1) * 16]
            ref = brute_force_rtn(w, bits, grid)
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
    for grid in ("sym", "absmax"):
        RTN(bits=3, grid=grid).compress("l", lin, None)
        assert (lin.weight[zeros] == 0).all()


def test_absmax_grid_is_mirror_symmetric_and_gptqs_is_not():
    """The SLiM seed's AbsMax grid maps ±max|w| to ±max|w| exactly (levels ±7 at 4 bits); GPTQ's
    symmetric grid has 16 levels from −8 to 7 steps of 2·max/15, so +max lands on 14/15·max."""
    w = torch.tensor([[-7.0, -2.0, 1.4, 7.0]])  # max 7: AbsMax's 4-bit step is exactly 1
    a = rtn_quantize(w, 4, -1, "absmax")
    assert a.dequantize().tolist() == [[-7.0, -2.0, 1.0, 7.0]]
    assert a.codes.tolist() == [[0, 5, 8, 14]] and a.zeros.item() == 7  # code 15 is never used
    g = rtn_quantize(w, 4, -1, "sym")
    assert g.dequantize()[0, 3].item() == pytest.approx(7 * 14 / 15, rel=1e-3)  # 7 steps of 2·7/15
    assert g.dequantize()[0, 0].item() == pytest.approx(-8 * 14 / 15, rel=1e-3)  # −7.5 steps round to −8: −7.47


def test_w8_is_nearly_lossless_and_w2_is_not():
    W = torch.randn(64, 128)
    e8 = (rtn_quantize(W, 8, 64).dequantize() - W).norm() / W.norm()
    e2 = (rtn_quantize(W, 2, 64).dequantize() - W).norm() / W.norm()
    assert e8 < 0.01 < 0.2 < e2


def test_storage_bits():
    W = torch.randn(8, 128)
    assert rtn_quantize(W, 4, 64).avg_bits() == pytest.approx(4 + (16 + 4) / 64)
    assert rtn_quantize(W, 4, 64, "sym").avg_bits() == pytest.approx(4 + 16 / 64)
    assert rtn_quantize(W, 4, 64, "absmax").avg_bits() == pytest.approx(4 + 16 / 64)
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
