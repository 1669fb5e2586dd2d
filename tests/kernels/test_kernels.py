"""Every kernel against its torch reference, under TRITON_INTERPRET=1 on the CPU (set in conftest),
on small shapes including odd ones and group edges; and the packed layouts against the checkpoint's."""

import pytest
import torch

from compresslab.checkpoint.pack import compact_nm, pack_bits
from compresslab.kernels import sparse24_w4_matmul, w4a16_matmul
from compresslab.kernels._triton import triton
from compresslab.kernels.sparse24_w4 import dequantize_24, sparse24_w4_ref, sparse24_w4_triton
from compresslab.kernels.w4a16 import dequantize_w4, w4a16_ref, w4a16_triton

needs_triton = pytest.mark.skipif(triton is None, reason="triton not installed")


def w4_operands(N, K, g, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    qweight = pack_bits(codes.reshape(-1), 4).reshape(N, K // 8)  # the checkpoint's stream, row-aligned
    scales = torch.rand(N, -(-K // g), generator=gen) * 0.1 + 0.01
    zeros = None if sym else torch.randint(0, 16, scales.shape, generator=gen).float()
    return codes, qweight, scales, zeros


@pytest.mark.parametrize("sym", [False, True])
def test_w4_layout_matches_the_checkpoint_stream(sym):
    codes, qweight, scales, zeros = w4_operands(8, 64, 32, sym)
    W = dequantize_w4(qweight, scales, zeros, 32, 64)
    z = 8.0 if sym else zeros.repeat_interleave(32, 1)
    torch.testing.assert_close(W, scales.repeat_interleave(32, 1) * (codes.float() - z))


@needs_triton
@pytest.mark.parametrize("M,N,K,g", [(1, 64, 128, 32), (3, 40, 96, 32), (16, 33, 64, 64), (5, 17, 192, 64)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("lowrank", [0, 5])
def test_w4a16_kernel_matches_reference(M, N, K, g, sym, lowrank):
    _, qweight, scales, zeros = w4_operands(N, K, g, sym)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    A = B = None
    if lowrank:
        A, B = torch.randn(lowrank, K) * 0.1, torch.randn(N, lowrank) * 0.1
    want = w4a16_ref(x, qweight, scales, zeros, g, A, B)
    got = w4a16_triton(x, qweight, scales, zeros, g, A, B)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def s24_operands(N, K, g, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    for i, j in enumerate(torch.randint(0, 6, (N * K // 4,), generator=gen).tolist()):
        a, b = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)][j]
        keep.view(-1, 4)[i, a] = keep.view(-1, 4)[i, b] = True
    keep = keep.reshape(N, K)
    idx, pos = compact_nm(keep, 2, 4)
    codes = torch.randint(0, 16, (N, K // 2), generator=gen)
    qkept = pack_bits(codes.reshape(-1), 4).reshape(N, K // 16)
    meta = pack_bits(pos.reshape(-1), 2).reshape(N, K // 32)
    scales = torch.rand(N, K // g, generator=gen) * 0.1 + 0.01
    zeros = None if sym else torch.randint(0, 16, scales.shape, generator=gen).float()
    return keep, idx, codes, qkept, meta, scales, zeros


def test_24_layout_matches_the_checkpoint_stream():
    keep, idx, codes, qkept, meta, scales, zeros = s24_operands(6, 64, 32, False)
    W = dequantize_24(qkept, meta, scales, zeros, 32, 64)
    assert torch.equal(W != 0, keep & (W != 0)) and ((W != 0).reshape(6, -1, 4).sum(-1) <= 2).all()
    g = idx // 32
    want = scales.gather(1, g) * (codes.float() - zeros.gather(1, g))
    torch.testing.assert_close(W.gather(1, idx), want)


@needs_triton
@pytest.mark.parametrize("M,N,K,g", [(1, 32, 64, 32), (3, 19, 128, 64), (16, 40, 96, 32)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("lowrank", [0, 3])
def test_sparse24_kernel_matches_reference(M, N, K, g, sym, lowrank):
    _, _, _, qkept, meta, scales, zeros = s24_operands(N, K, g, sym)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2))
    A = B = None
    if lowrank:
        A, B = torch.randn(lowrank, K) * 0.1, torch.randn(N, lowrank) * 0.1
    want = sparse24_w4_ref(x, qkept, meta, scales, zeros, g, A, B)
    got = sparse24_w4_triton(x, qkept, meta, scales, zeros, g, A, B)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dispatch_falls_back_with_a_log_line(monkeypatch, caplog):
    import compresslab.kernels._triton as kt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kt._warned.clear()
    _, qweight, scales, zeros = w4_operands(8, 64, 32, False)
    x = torch.randn(2, 64)
    with caplog.at_level("INFO", logger="compresslab.kernels"):
        y = w4a16_matmul(x, qweight, scales, zeros, 32)
        w4a16_matmul(x, qweight, scales, zeros, 32)
    torch.testing.assert_close(y, w4a16_ref(x, qweight, scales, zeros, 32))
    assert sum("torch reference" in r.message for r in caplog.records) == 1  # logged once
    _, _, _, qkept, meta, s, z = s24_operands(4, 64, 32, True)
    torch.testing.assert_close(sparse24_w4_matmul(x, qkept, meta, s, z, 32), sparse24_w4_ref(x, qkept, meta, s, z, 32))


@needs_triton
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_packed_linear_kernel_path_matches_dequantized_path(pattern):
    """The checkpoint's PackedLinear through the kernels equals its dequantize-on-the-fly path."""
    from torch import nn

    from compresslab.checkpoint.layer import PackedLinear, pack_linear
    from compresslab.lowrank.naive import NaiveSVD
    from compresslab.pruner.magnitude import Magnitude
    from compresslab.quantizer.rtn import RTN
    from compresslab.stages import layer_state

    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    layer_state(lin, create=True).original = lin.weight.detach().float().clone()
    if pattern:
        Magnitude(sparsity=0.5, pattern=pattern).compress("l", lin)
    RTN(bits=4, group_size=32).compress("l", lin)
    NaiveSVD(rank=4).compress("l", lin)
    packed = PackedLinear(*pack_linear(lin))
    ops = packed.kernel_operands()
    assert ops is not None and ops[0] == ("sparse24" if pattern else "w4a16")
    x = torch.randn(3, 128)
    W, A, B = packed.weight_and_adapters()
    kernel = sparse24_w4_triton if pattern else w4a16_triton
    got = kernel(x, *ops[1:], A=A, B=B) + packed.tensors()["bias"].float()
    torch.testing.assert_close(got, packed(x), atol=1e-4, rtol=1e-4)


def _block_case(b, out, g, grid, dynamic, masked, seed=0):
    from compresslab.quantizer.grid import max_code

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * b, b, generator=gen) @ (torch.eye(b) + 0.3 * torch.randn(b, b, generator=gen))
    H = X.T @ X / X.shape[0] + 0.01 * torch.eye(b)
    U1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Wt = torch.randn(b, out, generator=gen)
    ng = -(-b // g)
    maxq = torch.full((ng,), float(max_code(3, grid)))
    maxq[0] = float(max_code(4, grid))  # mixed widths per group
    S = torch.rand(ng, out, generator=gen) * 0.2 + 0.05
    Z = torch.randint(0, 7, (ng, out), generator=gen).float() if grid == "asym" else (
        torch.zeros(ng, out) + (maxq[:, None] + 1) / 2 if grid == "sym" else torch.zeros(ng, out) + maxq[:, None] / 2)
    keep = torch.rand(b, out, generator=gen) > 0.3 if masked else None
    return Wt, U1, S, Z, maxq, keep


@needs_triton
@pytest.mark.parametrize("grid", ["asym", "sym", "absmax"])
@pytest.mark.parametrize("dynamic,masked", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("b,out,g", [(32, 40, 16), (48, 24, 48)])
def test_gptq_block_kernel_matches_reference(grid, dynamic, masked, b, out, g):
    """The fused block sweep against the plain torch reference: quantized values, errors and (dynamic)
    group ranges; odd row counts, a non-power-of-2 block, mixed group widths, a held mask."""
    from compresslab.kernels.obs_block import gptq_block_ref, gptq_block_triton

    Wt, U1, S, Z, maxq, keep = _block_case(b, out, g, grid, dynamic, masked)
    ref = [t.clone() for t in (Wt, S, Z)]
    got = [t.clone() for t in (Wt, S, Z)]
    E_ref = gptq_block_ref(ref[0], U1, ref[1], ref[2], maxq, g, 0, grid, dynamic, keep)
    E_got = gptq_block_triton(got[0], U1, got[1], got[2], maxq, g, 0, grid, dynamic, keep, block_r=16)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)
    codes = lambda W, S: torch.round(W / S.repeat_interleave(g, 0)[:b])  # noqa: E731
    same = (codes(got[0], got[1]) == codes(ref[0], ref[1])).float().mean()
    assert same > 0.99, float(same)  # float order of the rank-1 pushes may flip a rare tie
    torch.testing.assert_close(E_got, E_ref, rtol=1e-3, atol=1e-3 * float(E_ref.abs().max()))
    if masked:
        assert (got[0][~keep] == 0).all()


@needs_triton
@pytest.mark.parametrize("group_size,grid", [(16, "asym"), (-1, "absmax")])
def test_obs_compress_with_the_fused_block_matches_the_torch_path(monkeypatch, group_size, grid):
    """obs_compress dispatching each block to the kernel (forced here, on the CPU under the
    interpreter) gives the torch path's result: same grid, same codes up to rare float-order ties."""
    import compresslab.obs as obs
    from compresslab.kernels.obs_block import gptq_block_triton

    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=gen) @ (torch.eye(64) + 0.2 * torch.randn(64, 64, generator=gen))
    H = 2 * X.T @ X / 256
    W = torch.randn(24, 64, generator=gen)
    keep = torch.rand(24, 64, generator=gen) > 0.5
    spec = obs.GridSpec(3, group_size, grid)
    W_t, q_t, _ = obs.obs_compress(W, H, quant=spec, keep=keep, blocksize=32)
    monkeypatch.setattr(obs, "fused_block_sweep", lambda *a: gptq_block_triton)
    W_k, q_k, _ = obs.obs_compress(W, H, quant=spec, keep=keep, blocksize=32)
    torch.testing.assert_close(q_k.scales, q_t.scales, rtol=1e-5, atol=0)
    same = (q_k.encode(W_k).codes == q_t.encode(W_t).codes).float().mean()
    assert same > 0.99, float(same)
    assert (W_k[~keep] == 0).all()


def lut4_operands(N, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    qweight = pack_bits(codes.reshape(-1), 4).reshape(N, K // 8)
    lut = torch.randn(N, 16, generator=gen).sort(1).values.half()
    return codes, qweight, lut


def test_lut4_layout_matches_the_checkpoint_stream():
    from compresslab.kernels.lut_gemv import dequantize_lut4

    codes, qweight, lut = lut4_operands(8, 64)
    W = dequantize_lut4(qweight, lut, 64)
    want = torch.tensor([[float(lut[n, codes[n, k]]) for k in range(64)] for n in range(8)])
    torch.testing.assert_close(W, want)


@needs_triton
@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (3, 40, 96), (16, 33, 64), (5, 17, 192)])
@pytest.mark.parametrize("lowrank", [0, 5])
def test_lut4_kernel_matches_reference(M, N, K, lowrank):
    from compresslab.kernels.lut_gemv import lut4_ref, lut4_triton

    _, qweight, lut = lut4_operands(N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    A = B = None
    if lowrank:
        A, B = torch.randn(lowrank, K) * 0.1, torch.randn(N, lowrank) * 0.1
    torch.testing.assert_close(lut4_triton(x, qweight, lut, A, B), lut4_ref(x, qweight, lut, A, B),
                               atol=1e-4, rtol=1e-4)


def test_add_sparse_is_the_dense_product():
    from compresslab.kernels.lut_gemv import add_sparse

    g = torch.Generator().manual_seed(3)
    S = torch.zeros(6, 10)
    rows, cols = torch.tensor([0, 0, 3, 5]), torch.tensor([1, 9, 4, 1])
    vals = torch.randn(4, generator=g)
    S[rows, cols] = vals
    x = torch.randn(2, 10, generator=g)
    y0 = torch.randn(2, 6, generator=g)
    torch.testing.assert_close(add_sparse(y0.clone(), x, rows, cols, vals), y0 + x @ S.T)
