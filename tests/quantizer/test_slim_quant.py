import pytest
import torch

from compresslab.quantizer.slim_quant import search_alpha_hist, slim_quantize
from compresslab.quantizer.rtn import rtn_quantize


def absmax_clip(w, c, bits):
    """The SLiM seed's AbsMax grid clipped at c, from its definition: step c/(2^(b−1)−1) (an fp16
    value), levels −(2^(b−1)−1)…(2^(b−1)−1) steps."""
    k = 2 ** (bits - 1) - 1
    s = float(torch.tensor(float(c) / k).half())
    return s * torch.clamp(torch.round(w / s), -k, k)


def brute_force_alpha(w, bits, n=400):
    """The exact-MSE optimum over a dense grid of α, on the weights themselves."""
    wmax = w.abs().max()
    best = None
    for a in torch.linspace(0.05, 1.0, n):
        e = (w - absmax_clip(w, a * wmax, bits)).square().mean()
        if best is None or e < best[0]:
            best = (e, float(a))
    return best


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
@pytest.mark.parametrize("bits", [3, 4])
def test_alpha_search_finds_the_optimum(dist, bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200_000, generator=g) if dist == "gauss" else \
        torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    e_best, a_best = brute_force_alpha(w, bits)
    a = search_alpha_hist(w, bits)
    e = (w - absmax_clip(w, a * w.abs().max(), bits)).square().mean()
    assert a < 0.9  # heavy tails: clipping pays off
    assert abs(a - a_best) < 0.03, (a, a_best)
    assert e <= e_best * 1.02


def test_slim_quant_beats_absmax_and_keeps_zeros():
    W = torch.distributions.Laplace(0.0, 1.0).sample((32, 256))
    W[:, ::4] = 0
    for g in (-1, 64):
        W_hat, qw, _ = slim_quantize(W, 4, g)
        absmax = rtn_quantize(W, 4, g, "absmax").dequantize()
        assert (W - W_hat).square().mean() < (W - absmax).square().mean()
        assert torch.all(W_hat[:, ::4] == 0)
        assert torch.allclose(qw.encode(W_hat).dequantize(), W_hat, atol=1e-5)


def test_slim_quant_lies_on_the_absmax_grid():
    """Every SLiM-Quant weight of a group is a multiple of that group's step c/(2^(b−1)−1), with at
    most 2^b − 1 distinct levels, symmetric around 0."""
    W = torch.distributions.Laplace(0.0, 1.0).sample((8, 128))
    W_hat, qw, alpha = slim_quantize(W, 3, 32)
    assert qw.grid == "absmax" and (qw.zeros == 3).all()
    for r in range(8):
        for j in range(4):
            step = qw.scales[r, j]
            k = W_hat[r, j * 32:(j + 1) * 32] / step
            torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
            assert k.abs().max() <= 3 + 1e-4
