import pytest
import torch

from compresslab.stats import LayerStats, gram_full, gram_upper_


@pytest.mark.parametrize("d,block", [(200, 64), (600, 256), (96, 256)])
def test_symmetric_gram_equals_the_full_product(d, block):
    """The blocked upper-triangle accumulation, mirrored, is XᵀX (float64 reference), and it never
    touches the blocks below the diagonal (that is the FLOPs it saves)."""
    torch.manual_seed(0)
    acc = torch.zeros(d, d)
    xs = [torch.randn(n, d) * torch.linspace(0.1, 3, d) for n in (37, 128, 5)]
    for x in xs:
        gram_upper_(acc, x, block)
    X = torch.cat(xs).double()
    torch.testing.assert_close(gram_full(acc).double(), X.T @ X, rtol=1e-5, atol=1e-4)
    if d > block:
        assert (acc[block:, :block] == 0).all()


def test_layer_stats_hessian_is_symmetric_and_exact():
    torch.manual_seed(1)
    st = LayerStats({"hessian"}, 576)
    xs = [torch.randn(2, 64, 576), torch.randn(3, 64, 576)]
    for x in xs:
        st.add_batch(x)
    X = torch.cat([x.reshape(-1, 576) for x in xs]).double()
    H = st.hessian
    torch.testing.assert_close(H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.T)
    H.zero_()  # a caller changing its copy does not change the statistics
    assert st.hessian.abs().sum() > 0
