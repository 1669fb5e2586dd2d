import pytest
import torch

from compresslab.stats import LayerStats, gram_upper_, mirror_upper_


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
    torch.testing.assert_close(mirror_upper_(acc.clone()).double(), X.T @ X, rtol=1e-5, atol=1e-4)
    if d > block:
        assert (acc[block:, :block] == 0).all()


def test_layer_stats_hessian_is_symmetric_and_exact():
    torch.manual_seed(1)
    st = LayerStats({"hessian"}, 576)
    acc_ptr = st._xtx.data_ptr()
    xs = [torch.randn(2, 64, 576), torch.randn(3, 64, 576)]
    for x in xs:
        st.add_batch(x)
    X = torch.cat([x.reshape(-1, 576) for x in xs]).double()
    H = st.hessian
    torch.testing.assert_close(H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.T)
    assert st.hessian is H  # built once
    assert H.data_ptr() == acc_ptr  # in the accumulator's memory: no second (d, d) matrix
    with pytest.raises(RuntimeError, match="after the Hessian was read"):  # the sum is gone: no silent mix
        st.add_batch(torch.randn(1, 64, 576))


def test_mirror_upper_is_the_upper_triangle_exactly():
    """Block sizes that do not divide d, and a lower triangle full of junk that must be overwritten."""
    torch.manual_seed(2)
    for d, block in ((7, 3), (576, 256), (100, 100), (5, 8)):
        A = torch.randn(d, d)
        want = torch.triu(A) + torch.triu(A, 1).T
        assert torch.equal(mirror_upper_(A.clone(), block), want)


def _stages_that_read_the_hessian():
    """Every pruner, quantizer and low-rank config that needs H, instantiated from its yaml."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "conf"
    for group in ("pruner", "quantizer", "lowrank"):
        for path in sorted((root / group).glob("*.yaml")):
            cfg = OmegaConf.load(path)
            if "_target_" not in cfg or OmegaConf.missing_keys(cfg):  # e.g. pruner=mask needs a path
                continue
            if "group_size" in cfg:
                cfg.group_size = 32
            for key in ("epochs", "nsamples"):  # SliM-LLM+'s clipping: one short epoch
                if key in cfg:
                    cfg[key] = 1
            stage = instantiate(cfg)
            if "hessian" in stage.needs:
                yield f"{group}={path.stem}", stage


def test_no_stage_modifies_the_shared_hessian():
    """`LayerStats.hessian` is one tensor shared by the group's stages (no copy per access): every
    stage that reads it must leave it bitwise unchanged."""
    stages = list(_stages_that_read_the_hessian())
    assert {"pruner=sparsegpt", "quantizer=gptq", "quantizer=awq", "lowrank=eora"} <= {n for n, _ in stages}
    for name, stage in stages:
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 48, bias=False)
        st = LayerStats(set(stage.needs), 64)
        x = torch.randn(4, 32, 64) @ torch.randn(64, 64)
        x[..., 5] = 0  # a dead input column: the sweep patches its diagonal in its own copy, never in H
        st.add_batch(x)
        before = st.hessian.clone()
        stage.compress("layer", lin, st)
        assert torch.equal(st.hessian, before), name
