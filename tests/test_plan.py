"""The memory plan: sizes, the chunk choice, the cost model against counted bytes, the engine's wiring."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.models.adapters import adapter_for
from compresslab.plan import Shape, estimate, make_plan, parse_memory
from conftest import LiveBytes, Recorder


def llama(**kw):
    cfg = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def test_parse_memory():
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("800MB") == 800_000_000
    assert parse_memory(2**30) == 2**30
    assert parse_memory("auto") == "auto"
    assert parse_memory(None) is None
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ConfigError, match=r"engine.max_memory=.*use e.g. 40GB"):
            parse_memory(bad)


@pytest.mark.parametrize("bad", [{"max_memory": "lots"}, {"chunk_size": 0}, {"chunk_size": "some"}])
def test_engine_rejects_bad_options_when_built(bad):
    with pytest.raises(ConfigError, match=r"engine\.(max_memory|chunk_size)"):
        SequentialEngine(device="cpu", **bad)


def test_plan_takes_one_pass_when_it_fits_and_the_largest_chunk_that_fits_otherwise():
    cfg = llama().config
    n, t = 64, 128
    for kw in ({"hessian": False}, {"hessian": True, "dense_copy": True}):
        one = make_plan(cfg, n, t, budget=None, **kw)
        assert one.chunk_size is None
        assert make_plan(cfg, n, t, budget=one.est_bytes, **kw).chunk_size is None
        for k_fit in (n // 2, 5, 1):
            budget = estimate(Shape.of(cfg), n, t, k_fit, **kw) + 1000
            assert budget < one.est_bytes  # one pass does not fit
            plan = make_plan(cfg, n, t, budget=budget, **kw)
            # brute force over every chunk size: the plan's is the largest whose estimate fits
            fits = [k for k in range(1, n + 1) if estimate(Shape.of(cfg), n, t, k, **kw) <= budget]
            assert plan.chunk_size == max(fits) >= k_fit
            assert plan.est_bytes <= budget
        with pytest.raises(ConfigError, match=r"raise engine.max_memory, or lower data.nsamples / data.seqlen"):
            make_plan(cfg, n, t, budget=estimate(Shape.of(cfg), n, t, 0, **kw), **kw)


def test_plan_keeps_down_input_when_it_fits_beside_a_chunk():
    """With `mlp_writer` the plan prefers chunks that keep down_proj's (N, T, I) input (every Linear
    once per sample), the largest that fits; when no chunk fits beside it, chunks without it."""
    cfg = llama().config
    n, t, shape = 64, 128, Shape.of(cfg)
    kept = n * t * cfg.intermediate_size * 4
    for k_fit in (n // 2, 3):
        budget = estimate(shape, n, t, k_fit, keep_mlp_input=True) + 1000
        plan = make_plan(cfg, n, t, budget=budget, mlp_writer=True)
        fits = [k for k in range(1, n + 1) if estimate(shape, n, t, k, keep_mlp_input=True) <= budget]
        assert plan.keep_mlp_input and plan.chunk_size == max(fits) >= k_fit
        assert plan.est_bytes == estimate(shape, n, t, plan.chunk_size) + kept <= budget
        assert "down input kept" in plan.describe()
        assert not make_plan(cfg, n, t, budget=budget).keep_mlp_input  # blocks without the writer
    budget = estimate(shape, n, t, 1, keep_mlp_input=True) - 1  # p and one sample do not fit; chunks do
    plan = make_plan(cfg, n, t, budget=budget, mlp_writer=True)
    assert not plan.keep_mlp_input and plan.chunk_size >= 1 and plan.est_bytes <= budget
    assert make_plan(cfg, n, t, budget=None, chunk_size=8, mlp_writer=True).keep_mlp_input  # no limit: kept


def test_on_an_accelerator_hidden_states_go_to_the_host_when_they_do_not_fit_beside_the_block():
    cfg = llama().config
    n, t, cuda = 64, 128, torch.device("cuda")
    stream = 2 * n * t * cfg.hidden_size * 4
    budget = stream  # the stream alone fills it: no chunk fits beside it on the device
    plan = make_plan(cfg, n, t, budget=budget, device=cuda, hessian=False)
    assert plan.hidden_on_host and plan.chunk_size >= 1 and plan.est_bytes <= budget
    assert "hidden states on the host" in plan.describe()
    with pytest.raises(ConfigError):  # on the CPU the host is the device: nowhere else to go
        make_plan(cfg, n, t, budget=budget, hessian=False)
    roomy = make_plan(cfg, n, t, budget=stream + estimate(Shape.of(cfg), n, t, 8, hessian=False), device=cuda,
                      hessian=False)
    assert not roomy.hidden_on_host and roomy.chunk_size >= 8


def test_explicit_chunk_size_is_kept_and_estimated():
    cfg = llama().config
    assert make_plan(cfg, 64, 128, budget=1, chunk_size=8).chunk_size == 8
    assert make_plan(cfg, 64, 128, budget=1, chunk_size=None).chunk_size is None


@pytest.mark.parametrize("kv_heads,lean,inter", [(2, True, 160), (4, True, 160), (2, False, 160), (2, True, 512),
                                                (2, False, 512)])
def test_one_pass_estimate_bounds_the_bytes_a_block_forward_holds(monkeypatch, kv_heads, lean, inter):
    """The cost model's activation term against the bytes counted through torch's dispatcher
    during one block forward (input included): never below, at most 40% above."""
    from compresslab.models import adapters

    monkeypatch.setattr(adapters, "LEAN_ROWS", 64)  # up in row slices of the 288 tokens
    model = llama(num_key_value_heads=kv_heads, intermediate_size=inter)
    block = model.model.layers[0]
    n, t = 6, 48
    x = torch.randn(n, t, 64)
    pos = torch.arange(t)[None]
    emb = model.model.rotary_emb(x, pos)
    ctx = adapter_for(model).lean(block) if lean else torch.no_grad()
    with torch.no_grad(), ctx, LiveBytes(x) as counted:
        block(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
    est = estimate(Shape.of(model.config), n, t, None, mlp_copies=1 if lean else 3, hessian=False)
    assert counted.peak <= est <= 1.4 * counted.peak


def test_engine_chunks_under_a_small_budget_with_the_one_pass_result():
    model = llama()
    ids = torch.randint(0, 128, (12, 16))
    ref = SequentialEngine(device="cpu", chunk_size="auto", max_memory=None, progress=False)
    out_ref = ref.run(model, ids, [Recorder()], keep_outputs=True)
    assert out_ref["plan"].chunk_size is None
    budget = estimate(Shape.of(model.config), 12, 16, 4, hessian=True) + 1000
    eng = SequentialEngine(device="cpu", chunk_size="auto", max_memory=budget, progress=False)
    out = eng.run(model, ids, [Recorder()], keep_outputs=True)
    assert out["plan"].chunk_size == 4
    torch.testing.assert_close(out["outputs"], out_ref["outputs"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["gptq", "sparsegpt+gptq"])
@pytest.mark.parametrize("inter", [256, 96, 1024])  # 1024: down_proj (d = 1024) is the widest, its 3 d² term decides
def test_sweep_estimate_bounds_the_bytes_a_group_holds(stage, inter):
    """The cost model's statistics term against the bytes counted through torch's dispatcher while the
    engine compresses each group of a block (the group's H held, the dense originals, the stacked and
    working copies, the factorization, the codes): never below the widest group, at most 2x above."""
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.stages import fuse_stages
    from compresslab.stats import LayerStats

    torch.manual_seed(0)
    model = llama(intermediate_size=inter, num_hidden_layers=1)
    block = model.model.layers[0]
    stages = [GPTQ(bits=4, group_size=32)]
    if stage != "gptq":
        stages = fuse_stages([SparseGPT(sparsity=0.5, pattern="2:4"), *stages])
    adapter = adapter_for(model)
    engine = SequentialEngine(device="cpu", progress=False, distributed="off")
    peak = 0
    for group in adapter.linear_groups(block):
        d = group[0][1].in_features
        stats = LayerStats({"hessian"}, d)
        stats.add_batch(torch.randn(4, 32, d))
        with LiveBytes(stats.hessian) as counted:
            engine._compress_group(adapter, 0, group, stages, stats)
        peak = max(peak, counted.peak)
    est = estimate(Shape.of(model.config), 4, 32, None) - estimate(Shape.of(model.config), 4, 32, None, hessian=False)
    assert peak <= est <= 2 * peak


@pytest.mark.parametrize("device, max_memory, streamed, budget, est, expected", [
    ("cpu", "auto", False, 10 * 2**30, 2**30, True),
    ("cpu", None, False, None, 2**30, True),
    ("cpu", "auto", False, 3 * 2**29, 2**30, False),  # the budget does not hold the estimate twice
    ("cpu", "8GB", False, 8 * 10**9, 2**30, False),  # a byte budget the user set: memory first
    ("cpu", "auto", True, 10 * 2**30, 2**30, False),  # streamed from disk
    ("cuda", "auto", False, 10 * 2**30, 2**30, False),  # the forward's temporaries are on the device
])
def test_reuse_freed_only_where_memory_is_plentiful(device, max_memory, streamed, budget, est, expected):
    from compresslab.plan import Plan, with_reuse

    plan = with_reuse(Plan(None, est, budget), torch.device(device), max_memory, streamed)
    assert plan.reuse_freed is expected
    assert ("freed memory reused" in plan.describe()) is expected
    assert (plan.chunk_size, plan.est_bytes, plan.budget) == (None, est, budget)
