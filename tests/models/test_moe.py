"""Mixture-of-Experts (models/moe.py): fused experts as one MLP of Linears per expert, compressed with
their routed (or all) tokens' statistics, starved experts falling back, checkpoints round-tripping;
on tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 configs."""

import pytest
import torch
from torch import nn

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.metrics import compression_summary, experts_summary
from compresslab.models import as_linears
from compresslab.models.adapters import adapter_for
from compresslab.models.moe import LinearExperts, linear_experts, linear_routers
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ
from compresslab.stages import layer_state
from conftest import needs_data, small_data_dir

E, K = 4, 2  # experts, top-k
FAMILIES = {
    "mixtral": dict(num_local_experts=E),
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=32, decoder_sparse_step=1, head_dim=16),
    # MLA attention, a shared expert, and a first layer that is dense
    "deepseek_v3": dict(n_routed_experts=E, moe_intermediate_size=32, n_shared_experts=1, num_key_value_heads=4,
                        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}
ATTN = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
MLA = (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",),
       ("self_attn.o_proj",))
EXPERTS = (tuple((f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(E))
           + tuple((f"mlp.experts.{e}.down_proj",) for e in range(E)))
# family -> the groups of each of its 3 blocks, read off each family's forward: routed experts one group
# each (each reads its own tokens), every expert's gate/up before every expert's down (a wave each: see
# test_chunked_path_observes_each_wave_of_experts_in_one_pass), then (Qwen2-MoE: before them) the shared
# expert, an ordinary MLP
SHARED = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
EXPECTED = {
    "mixtral": [ATTN + EXPERTS] * 3,
    "qwen3_moe": [ATTN + EXPERTS] * 3,
    "qwen2_moe": [ATTN + SHARED + EXPERTS] * 3,  # its shared_expert_gate (one output) stays dense
    "deepseek_v3": [MLA + (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))]
    + [MLA + EXPERTS + (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                        ("mlp.shared_experts.down_proj",))] * 2,
}


def config(family, **extra):
    from transformers import AutoConfig

    kw = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=K, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=256, eos_token_id=256, pad_token_id=None)
    return AutoConfig.for_model(family, **{**kw, **FAMILIES[family], **extra})


def fused(family, seed=0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **extra)).eval()
    for name, p in model.named_parameters():  # transformers zero-inits some routers: random ones route
        if "gate.weight" in name and not p.any():
            nn.init.normal_(p, std=0.5)
    return model


def tiny(family, seed=0):
    model = fused(family, seed)
    assert as_linears(model)[1] == (2 if family == "deepseek_v3" else 3)
    return model


IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", [*FAMILIES, "olmoe"])
def test_linear_experts_give_the_fused_models_logits(family):
    from transformers import AutoModelForCausalLM

    if family == "olmoe":
        from transformers import AutoConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "olmoe", vocab_size=257, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=E, num_experts_per_tok=K)).eval()
    else:
        model = fused(family)
    with torch.no_grad():
        want = model(IDS).logits
    as_linears(model)
    assert not any(p.dim() > 2 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_experts_train_as_the_fused_tensors_did():
    """Recoveries train what requires grad (recovery/ste.py): every expert's Linears do, as the fused
    tensors did, and a loss reaches each expert the router sent tokens to."""
    model = tiny("mixtral")
    counts = routed_counts(model, IDS[:2])
    model(IDS[:2]).logits.square().mean().backward()
    for mlp, c in counts.items():
        for e in range(E):
            for p in ("gate_proj", "up_proj", "down_proj"):
                w = model.get_submodule(f"{mlp}.experts.{e}.{p}").weight
                assert w.requires_grad
                assert (w.grad is not None and bool(w.grad.any())) == bool(c[e]), (mlp, e, p)


@pytest.mark.parametrize("layout", ["gpt_oss", "mixtral"])
def test_every_fused_layout_splits_into_the_same_expert(layout):
    """GPT-OSS keeps its experts transposed (E, H, 2I), gate and up interleaved, with biases and its own
    clamped gating; Mixtral (E, 2I, H) concatenated. Each expert's MLP of Linears equals the fused
    computation, checked against a per-expert loop written here from the fused tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(num_local_experts=E, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                 sliding_window=8) if layout == "gpt_oss" else dict(num_local_experts=E)
    cfg = AutoConfig.for_model(layout, vocab_size=257, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=K, **extra)
    experts = AutoModelForCausalLM.from_config(cfg).model.layers[0].mlp.experts
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    x, idx, w = torch.randn(20, 64), torch.randint(0, E, (20, K)), torch.rand(20, K)
    want = torch.zeros(20, 64)
    for t in range(20):
        for j in range(K):
            e = int(idx[t, j])
            W1 = experts.gate_up_proj[e].T if experts.is_transposed else experts.gate_up_proj[e]  # (2I, H)
            W2 = experts.down_proj[e].T if experts.is_transposed else experts.down_proj[e]  # (H, I)
            h = W1 @ x[t] + (experts.gate_up_proj_bias[e] if experts.has_bias else 0)
            if layout == "gpt_oss":  # interleaved; GPT-OSS's gate: clamp, x·σ(αx), (up + 1)
                g, u = h[0::2].clamp(max=experts.limit), h[1::2].clamp(-experts.limit, experts.limit)
                a = g * torch.sigmoid(g * experts.alpha) * (u + 1)
            else:
                g, u = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
                a = torch.nn.functional.silu(g) * u
            want[t] += w[t, j] * (W2 @ a + (experts.down_proj_bias[e] if experts.has_bias else 0))
    with torch.no_grad():
        got = linear_experts(experts)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_groups_are_per_expert(family):
    model = tiny(family)
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    for i, block in enumerate(blocks):
        assert tuple(tuple(n for n, _ in g) for g in adapter.linear_groups(block)) == EXPECTED[family][i], i
        # every Linear of the block once, but for Qwen2-MoE's scalar shared_expert_gate
        linears = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.out_features > 1)
        assert sorted(n for g in EXPECTED[family][i] for n in g) == linears


class Seen:
    """An identity stage that records the number of tokens and the Hessian of every Linear's statistics."""

    needs = frozenset({"hessian"})

    def __init__(self):
        self.n, self.h = {}, {}

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        self.n[name], self.h[name] = stats.n, stats.hessian.clone()


def routed_counts(model, ids):
    """{'model.layers.i.mlp': (E,) tokens per expert} from the routers' own top-k indices."""
    counts, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, LinearExperts):
            router = model.get_submodule(name.rpartition(".")[0] + ".gate")
            hooks.append(router.register_forward_hook(
                lambda mod, a, out, name=name: counts.__setitem__(
                    name.rpartition(".")[0], torch.bincount(out[-1].flatten(), minlength=E))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_routed_statistics_come_from_the_routed_tokens(family, chunk):
    """Each expert's Linears see exactly the tokens its router sends it (counted from the router's
    top-k, independently), in one pass or in chunks; shared experts and attention see every token.
    With moe_calibration=all every expert sees every token, and gate/up's Hessian is the MoE input's,
    the same for all experts of a block."""
    model = tiny(family)
    want = routed_counts(model, IDS)  # the identity stage leaves the model as it is: the same routing
    seen = Seen()
    SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False, moe_min_tokens=1).run(model, IDS, [seen])
    tokens = IDS.numel()
    for name, n in seen.n.items():
        mlp, _, rest = name.partition(".experts.")
        if rest:
            e = int(rest.split(".")[0])
            assert n == int(want[mlp][e]), name
            assert layer_state(model.get_submodule(name)).tokens == n
            assert layer_state(model.get_submodule(name)).stats_from == "routed"
        else:
            assert n == tokens, name
    seen, model = Seen(), tiny(family)
    SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False, moe_calibration="all").run(
        model, IDS, [seen])
    for mlp in want:
        ns = [seen.n[f"{mlp}.experts.{e}.{p}"] for e in range(E) for p in ("gate_proj", "down_proj")]
        assert ns == [tokens] * len(ns)
        for e in range(1, E):
            torch.testing.assert_close(seen.h[f"{mlp}.experts.{e}.gate_proj"], seen.h[f"{mlp}.experts.0.gate_proj"])
    for name, lin in adapter_for(model).named_linears(model):
        if ".experts." in name:  # every token seen, and the routed count still reported
            mlp, _, rest = name.partition(".experts.")
            assert layer_state(lin).stats_from == "all", name
            assert layer_state(lin).tokens == int(want[mlp][int(rest.split(".")[0])]), name


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_a_starved_expert_falls_back_to_all_tokens_and_is_reported(family, chunk):
    """Expert 2 is never chosen (its router row pushed down, or DeepSeek's routing bias): routed-only it
    would have no statistics. It takes every token's instead, is still compressed (exact 2:4, 4-bit),
    and metrics report it; the others keep their routed tokens."""
    model = tiny(family)

    def never_2(mod, args, out):  # Mixtral's router with a bias of -inf on expert 2's logit
        logits = out[0].clone()
        logits[:, 2] = float("-inf")
        top, idx = logits.float().softmax(-1).topk(K, -1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    for name, m in model.named_modules():
        if name.endswith("mlp.gate"):
            if hasattr(m, "e_score_correction_bias"):  # DeepSeek's routing bias
                m.e_score_correction_bias[2] = -1e4
            else:
                m.register_forward_hook(never_2)
    want = routed_counts(model, IDS)
    assert all(int(c[2]) == 0 for c in want.values())
    seen = Seen()
    SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False).run(
        model, IDS, [seen, SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=16)])
    summary, rows = compression_summary(model)
    moe, experts = experts_summary(rows)
    starved = {r["expert"] for r in experts if r["stats_from"] == "all (starved)"}
    assert {f"{mlp}.experts.2" for mlp in want} <= starved
    assert moe["moe/starved"] == len(starved) and moe["moe/tokens_min"] == 0
    for r in experts:  # starved = fewer than moe_min_tokens (64) routed in the calibration
        assert (r["expert"] in starved) == (r["tokens"] < 64), r
        assert seen.n[r["expert"] + ".down_proj"] == (IDS.numel() if r["expert"] in starved else r["tokens"])
    for row in rows:
        assert row["nm_valid"] and row["bits"] == 4, row["name"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_gptq_compress_every_expert_and_round_trip(family, tmp_path):
    """Every expert's Linears pruned 2:4 exactly and quantized; the packed checkpoint stores them and
    loads back to a model with the same logits."""
    from compresslab.checkpoint import load_compressed, save_compressed

    model = tiny(family)
    SequentialEngine("cpu", max_memory=None, progress=False).run(model, IDS, [SparseGPT(0.5, "2:4"),
                                                                               GPTQ(bits=4, group_size=16)])
    summary, rows = compression_summary(model)
    names = {r["name"] for r in rows}
    for mlp in routed_counts(model, IDS[:1]):
        for e in range(E):
            assert {f"{mlp}.experts.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert all(r["nm_valid"] and r["bits"] == 4 for r in rows)
    assert summary["sparsity"] == pytest.approx(0.5)
    save_compressed(model, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    from compresslab.checkpoint.layer import PackedLinear

    packed = {n for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert packed == names  # every expert's layers stored packed, under their per-expert names
    with torch.no_grad():
        got, want = loaded(IDS).logits, model(IDS).logits
    # as for dense models (tests/checkpoint): fp16 scales, so close, and the same top token almost everywhere
    assert float((got - want).norm() / want.norm()) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_moe_options_are_checked_before_loading():
    with pytest.raises(ConfigError, match="engine.moe_calibration='some'.*routed, all"):
        SequentialEngine("cpu", moe_calibration="some")
    with pytest.raises(ConfigError, match="engine.moe_min_tokens=0 must be an int >= 1"):
        SequentialEngine("cpu", moe_min_tokens=0)
    with pytest.raises(ConfigError, match="engine.moe_router='yes' is not one of dense, compress"):
        SequentialEngine("cpu", moe_router="yes")


def gpt_oss(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=257, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=K, num_local_experts=E,
                               head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():  # a router with a bias that matters
        if "router" in name:
            nn.init.normal_(p, std=0.5)
    return model


ROUTER = {"mixtral": "mlp.gate", "qwen2_moe": "mlp.gate", "qwen3_moe": "mlp.gate", "deepseek_v3": "mlp.gate",
          "gpt_oss": "mlp.router"}


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_a_router_with_a_linear_projection_gives_the_same_logits(family):
    """engine.moe_router=compress makes each router's projection a Linear `proj` (its weight the same
    Parameter, GPT-OSS's bias moved with it); the family's routing code then runs on proj(x) padded
    against [I | 0]: the logits are bitwise the same, and the router's output is its own again."""
    model = gpt_oss() if family == "gpt_oss" else fused(family)
    as_linears(model)
    with torch.no_grad():
        want = model(IDS).logits
    moes = [n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, LinearExperts)]
    weights = {n: model.get_submodule(f"{n}.{ROUTER[family].split('.')[1]}").weight for n in moes}
    assert linear_routers(model) == len(moes) and linear_routers(model) == 0  # twice: nothing more to do
    for n in moes:
        router = model.get_submodule(f"{n}.{ROUTER[family].split('.')[1]}")
        assert isinstance(router.proj, nn.Linear) and router.proj.weight is weights[n]
        assert "weight" not in dict(router.named_parameters(recurse=False))
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_routers_stay_dense_by_default():
    """The default: every router weight bitwise as it was after sparsegpt 2:4 + gptq, and no router in
    the per-layer table."""
    model = tiny("mixtral")
    before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    SequentialEngine("cpu", max_memory=None, progress=False).run(model, IDS, [SparseGPT(0.5, "2:4"),
                                                                               GPTQ(bits=4, group_size=16)])
    assert len(before) == 3
    for n, w in before.items():
        assert torch.equal(model.get_submodule(n.rpartition(".")[0]).weight, w)
    assert not any("gate" in r["name"] and "experts" not in r["name"] for r in compression_summary(model)[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_routers_see_every_token_and_round_trip(family, tmp_path):
    """engine.moe_router=compress: each router's projection gets the Hessian of every token reaching
    the MoE block (2/n Σ x xᵀ from the router's inputs, captured here on the dense model), is pruned 2:4
    exactly and quantized to 4 bits, grouped with the shared experts where they read the same input;
    the packed checkpoint loads back to the same logits."""
    from compresslab.checkpoint import load_compressed, save_compressed
    from compresslab.checkpoint.layer import PackedLinear

    model = tiny(family)
    xs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    seen = Seen()
    SequentialEngine("cpu", max_memory=None, progress=False, moe_router="compress").run(model, IDS, [seen])
    assert {n for n in seen.h if n.endswith("mlp.gate.proj")} == {f"{n}.proj" for n in xs} and xs
    for n, X in xs.items():  # the identity stage left the model dense: the same inputs
        torch.testing.assert_close(seen.h[f"{n}.proj"].double(), 2 / X.shape[0] * X.double().T @ X.double(),
                                   rtol=1e-4, atol=1e-5)
    adapter = adapter_for(model)
    groups = [tuple(n for n, _ in g) for g in adapter.linear_groups(adapter.block_list(model)[-1])]
    shared = {"qwen2_moe": "mlp.shared_expert.gate_proj", "deepseek_v3": "mlp.shared_experts.gate_proj"}
    router_group = next(g for g in groups if "mlp.gate.proj" in g)
    assert (shared[family] in router_group) if family in shared else router_group == ("mlp.gate.proj",)

    model = tiny(family)
    SequentialEngine("cpu", max_memory=None, progress=False, moe_router="compress").run(
        model, IDS, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=16)])
    rows = {r["name"]: r for r in compression_summary(model)[1]}
    routers = {f"{n}.proj" for n in xs}
    assert routers <= set(rows) and all(rows[n]["nm_valid"] and rows[n]["bits"] == 4 for n in routers)
    save_compressed(model, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    assert routers <= {n for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    with torch.no_grad():
        got, want = loaded(IDS).logits, model(IDS).logits
    assert float((got - want).norm() / want.norm()) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_what_cannot_hold_fused_experts_says_why(tmp_path):
    from compresslab.export import export_compressed_tensors
    from compresslab.models.loaders import HFModel, byte_tokenizer
    from compresslab.quantizer.rtn import RTN

    model = fused("mixtral")
    model.save_pretrained(tmp_path / "mixtral")
    byte_tokenizer().save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ConfigError, match="cannot stream fused Mixture-of-Experts"):
        HFModel(str(tmp_path / "mixtral"), offload="disk").load_streamed()
    loaded, _ = HFModel(str(tmp_path / "mixtral"), device="cpu").load()
    SequentialEngine("cpu", max_memory=None, progress=False).run(loaded, None, [RTN(bits=4, group_size=32, grid="sym")])
    with pytest.raises(ConfigError, match="fused 3-D tensors.*compresslab.save"):
        export_compressed_tensors(loaded, tmp_path / "out")


@needs_data
def test_run_py_compresses_saved_moe_models_with_every_kind_of_stage(tmp_path):
    """The README's MoE commands on checkpoints saved as transformers writes them (fused experts):
    sparsegpt 2:4 + gptq with routed and all calibration on the four families, and on Mixtral the other
    pruners and quantizers with SLiM low-rank adapters and BEAM. Every job ok with a finite ppl; every
    expert's Linears in the per-layer table, exactly 2:4 and quantized; the experts table in metrics.json."""
    import os
    import subprocess
    import sys

    from compresslab.models.loaders import byte_tokenizer
    from test_sweeps import ROOT, records

    folders = {}
    for family in FAMILIES:
        folders[family] = tmp_path / "ckpt" / family
        fused(family).save_pretrained(folders[family])
        byte_tokenizer().save_pretrained(folders[family])
    data = small_data_dir(tmp_path / "data")
    env = {**os.environ, "COMPRESSLAB_DATA_DIR": str(data), "TQDM_DISABLE": "1"}
    common = ["data.nsamples=8", "data.seqlen=32", "eval.seqlen=64", "eval.max_windows=2", "logger=none",
              "engine.progress=false", "eval.progress=false", "quantizer.group_size=16"]
    sweeps = {
        "families": [f"model.name_or_path={','.join(str(f) for f in folders.values())}", "pruner=sparsegpt",
                     "pruner.pattern=2:4", "quantizer=gptq", "engine.moe_calibration=routed,all"],
        "stages": [f"model.name_or_path={folders['mixtral']}", "pruner=magnitude,wanda", "pruner.pattern=2:4",
                   "quantizer=rtn,slim_llm", "lowrank=slim", "recovery=beam", "recovery.epochs=1"],
    }
    recs = []
    for name, args in sweeps.items():
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "model=hf", *args, *common,
                              f"hydra.sweep.dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        recs += list(records(tmp_path / name).values())
    assert len(recs) == 8 + 4
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert r["metrics"]["ppl/wikitext2"] < float("inf")
        family = r["config"]["model"]["name_or_path"].rsplit("/", 1)[-1]
        names = {row["name"] for row in r["layers"]}
        mlps = [i for i, layout in enumerate(EXPECTED[family]) if EXPERTS[0] in layout]
        want = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in mlps for e in range(E)
                for p in ("gate_proj", "up_proj", "down_proj")}
        assert want <= names, family
        assert all(row["nm_valid"] and row["bits"] is not None for row in r["layers"]), family
        experts = {x["expert"]: x for x in r["experts"]}
        assert set(experts) == {n.rpartition(".")[0] for n in want}
        mode = r["config"]["engine"]["moe_calibration"]
        assert r["metrics"]["moe/experts"] == len(experts)
        assert all((x["stats_from"] == "all") == (mode == "all") for x in experts.values())


@needs_data
def test_readme_moe_commands_run_as_printed(tmp_path):
    """The two MoE commands of the README, read from it, with tiny data settings appended: ok, every
    expert of the tiny 8-expert models compressed, routed and all calibration both run."""
    import os
    import subprocess
    import sys

    from test_sweeps import ROOT, records

    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith(".venv/bin/python run.py") and "model.family=" in ln and "moe" in ln]
    assert len(lines) == 2, lines
    env = {**os.environ, "COMPRESSLAB_DATA_DIR": str(small_data_dir(tmp_path / "data")), "TQDM_DISABLE": "1"}
    tiny = ["data.nsamples=4", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2", "logger=none",
            "engine.progress=false", "eval.progress=false"]
    recs, routers_asked = [], set()
    for k, line in enumerate(lines):
        out_dir = tmp_path / f"cmd{k}"
        args = line.split()[2:] + tiny + [f"hydra.{'sweep' if '-m' in line.split() else 'run'}.dir={out_dir}"]
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        recs += list(records(out_dir).values())
    assert len(recs) == 1 + 4
    modes = set()
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert r["metrics"]["moe/experts"] == 2 * 8  # 2 layers of 8 experts
        assert all(row["bits"] == 4 for row in r["layers"])
        modes.add(r["config"]["engine"]["moe_calibration"])
        routers = {row["name"] for row in r["layers"] if row["name"].endswith("mlp.gate.proj")}
        want = {f"model.layers.{i}.mlp.gate.proj" for i in range(2)}
        assert routers == (want if r["config"]["engine"]["moe_router"] == "compress" else set())
        routers_asked.add(r["config"]["engine"]["moe_router"])
    assert modes == {"routed", "all"} and routers_asked == {"dense", "compress"}


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_path_sees_the_one_pass_statistics(family):
    """Chunks of 3 of 8 samples (the last short) give every group, experts included, the Hessian of the
    one pass; the experts under moe_min_tokens (128, the average here) are starved in both,
    since chunks decide on the whole set's counts too."""
    from conftest import Recorder

    seen, starved = {}, {}
    for chunk in (None, 3):
        rec, model = Recorder(), tiny(family)
        SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False, moe_min_tokens=128).run(
            model, IDS, [rec])
        seen[chunk] = dict(rec.calls)
        starved[chunk] = {r["expert"] for r in experts_summary(compression_summary(model)[1])[1]
                          if r["stats_from"] == "all (starved)"}
    assert starved[3] == starved[None] and starved[None]  # in one pass experts come in forward order, in chunks wave by wave
    assert sorted(seen[None]) == sorted(seen[3]) and len(seen[3]) == len(rec.calls)  # each group once
    for name, (h1, _) in seen[None].items():
        torch.testing.assert_close(seen[3][name][0], h1, rtol=1e-4, atol=1e-6 * float(h1.abs().max()), msg=name)


@pytest.mark.parametrize("per_pass,passes", [(None, 2), (2, 4)])
def test_chunked_path_observes_each_wave_of_experts_in_one_pass(monkeypatch, per_pass, passes):
    """In chunks, the experts' gate/up groups share one statistics pass and their down groups another
    (per expert and group it would be 2E passes through the router); when the memory plan has room for
    only `per_pass` Hessians at once, a wave takes more passes. Counted at the router: per block, the
    passes times 3 chunks, plus the routing pass's 3 (whole-set counts first) and the propagation's 3."""
    from conftest import Recorder

    if per_pass is not None:
        monkeypatch.setattr(SequentialEngine, "_wave_size", lambda self, d, needs: per_pass)
    model = tiny("mixtral")
    calls = []
    for name, m in model.named_modules():
        if name.endswith("mlp.gate"):
            m.register_forward_pre_hook(lambda mod, a, name=name: calls.append(name))
    SequentialEngine("cpu", chunk_size=3, max_memory=None, progress=False).run(model, IDS, [Recorder()])
    for i in range(3):
        assert calls.count(f"model.layers.{i}.mlp.gate") == (passes + 2) * 3


def test_a_fused_model_given_to_the_engine_is_split_first():
    """compress(model) on a model loaded by transformers itself (fused experts): the engine splits the
    experts before tracing, so they are compressed, not silently left dense."""
    from compresslab import compress
    from compresslab.quantizer.rtn import RTN

    model = fused("qwen3_moe")
    with torch.no_grad():
        want = model(IDS).logits
    report = compress(model, quantizer=RTN(bits=8, group_size=16), engine=SequentialEngine("cpu", progress=False))
    names = {row["name"] for row in report.layers}
    assert {f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(3) for e in range(E)} <= names
    with torch.no_grad():  # 8-bit: the same model to within rounding
        assert float((model(IDS).logits - want).norm() / want.norm()) < 1e-2


def test_wave_size_fits_the_budget():
    """As many experts' statistics at once as the budget holds beside the plan's estimate (which counts
    one group's): 4 d² bytes per Hessian, and SliM-LLM's input sample when asked for."""
    from compresslab.plan import Plan
    from compresslab.stats import SAMPLE_MAX

    engine = SequentialEngine("cpu", progress=False)
    d = 64
    per = 4 * d * d + 16 * d
    engine.plan = Plan(chunk_size=2, est_bytes=10_000, budget=10_000 + 5 * per)
    assert engine._wave_size(d, {"hessian"}) == 6
    per_sample = per + 4 * SAMPLE_MAX * d
    engine.plan = Plan(chunk_size=2, est_bytes=10_000, budget=10_000 + 2 * per_sample)
    assert engine._wave_size(d, {"hessian", "input_sample"}) == 3
    engine.plan = Plan(chunk_size=2, est_bytes=10_000, budget=5_000)  # over budget already: still one at a time
    assert engine._wave_size(d, {"hessian"}) == 1


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_tiny_moe_families_have_8_experts_top2(family):
    """model=tiny_llama model.family=<moe family>: 8 experts of intermediate_size, top-2; DeepSeek-V3 with
    MLA at this width and one dense first layer, so that its second layer is MoE."""
    from compresslab.models.loaders import TinyModel

    model, _ = TinyModel(family, num_layers=2).load()
    moes = [m for m in model.modules() if isinstance(m, LinearExperts)]
    assert len(moes) == (1 if family == "deepseek_v3" else 2)
    assert all(len(m) == 8 and m[0].down_proj.in_features == 128 for m in moes)
    assert model.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert torch.isfinite(model(IDS[:1]).logits).all()


def test_gpt_oss_experts_compress_end_to_end():
    """GPT-OSS's experts (transposed, interleaved gate/up, biases, clamped gate) through the engine: split
    with the same logits, every expert's Linears 2:4 and 4-bit, the compressed model's logits finite."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=257, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                               num_experts_per_tok=K, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():
        if ".experts." in name or name.endswith("router.weight"):
            nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        want = model(IDS).logits
    assert as_linears(model)[1] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    SequentialEngine("cpu", max_memory=None, progress=False).run(model, IDS, [SparseGPT(0.5, "2:4"),
                                                                               GPTQ(bits=4, group_size=16)])
    summary, rows = compression_summary(model)
    experts = {r["name"] for r in rows if ".experts." in r["name"]}
    assert len(experts) == 2 * E * 3 and all(r["nm_valid"] and r["bits"] == 4 for r in rows)
    assert all(model.get_submodule(n).weight.is_contiguous() for n in experts)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_group_the_forward_never_calls_is_an_error_not_a_dense_layer(chunk):
    """If a block's forward skips a group (here block 0's MLP returns its input), its Linears would
    stay dense while the run reports them compressed: one pass and chunks both stop with the names."""
    from compresslab.models.loaders import TinyModel
    from compresslab.quantizer.gptq import GPTQ

    model, _ = TinyModel("llama", num_layers=2).load()
    model.model.layers[0].mlp.forward = lambda x: x
    with pytest.raises(RuntimeError, match=r"block 0: the forward never called .*mlp\.gate_proj"):
        SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False).run(
            model, IDS[:4], [GPTQ(bits=4, group_size=32)])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fisher_pass_gives_zero_to_experts_no_token_reaches(family):
    """A short window leaves some experts without a token (no gradient at all): their Fisher is exactly
    0, and every reached expert's equals a pass over the reached Linears alone (where none is unused)."""
    from compresslab.fisher import fisher_diagonal

    model = tiny(family)
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1))
    linears = list(adapter_for(model).named_linears(model))
    called = set()
    hooks = [lin.register_forward_hook(lambda m, a, o, n=n: called.add(n) if a[0].shape[0] else None)
             for n, lin in linears]
    fisher, n = fisher_diagonal(model, ids, linears)
    for h in hooks:
        h.remove()
    unused = [name for name, _ in linears if name not in called]
    assert n == 1 and unused  # the case under test happened
    assert all(not fisher[name].any() for name in unused)
    reached, _ = fisher_diagonal(model, ids, [(name, lin) for name, lin in linears if name in called])
    for name in reached:
        torch.testing.assert_close(fisher[name], reached[name], rtol=1e-6, atol=0)
