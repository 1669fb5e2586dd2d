"""The traced adapter (models/discover.py): blocks, inputs, outputs and Linear groups of any decoder-only
family, checked against groups written out here by hand from each family's modeling code; the engine
on every family (its blocks' own kwargs, every Linear compressed, exact 2:4, GPTQ below RTN); and
run.py on saved checkpoints through model=hf."""

import math

import pytest
import torch
from torch import nn

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.models.adapters import _ADAPTERS, adapter_for
from compresslab.models.conv1d import conv1d_to_linear
from compresslab.models.discover import discover
from compresslab.models.loaders import TinyModel, byte_tokenizer
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ
from compresslab.quantizer.rtn import RTN
from compresslab.stages import layer_state
from conftest import needs_data, small_data_dir

LLAMA_LIKE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
# family -> (blocks, Linear groups in true-sequential order), read off each family's modeling code
EXPECTED = {
    **{f: ("model.layers", LLAMA_LIKE) for f in ("llama", "mistral", "qwen2", "smollm3", "qwen3", "gemma2",
                                                  "gemma3_text", "stablelm", "olmo2", "granite")},
    "phi3": ("model.layers", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                              ("mlp.down_proj",))),
    # one layer norm feeds attention and MLP side by side (parallel_attn): one group, one Hessian
    "falcon": ("transformer.h", (("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",),
                                 ("mlp.dense_4h_to_h",))),
    "opt": ("model.decoder.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("self_attn.out_proj",), ("fc1",), ("fc2",))),
    # parallel too, but attention and MLP have a norm each: two inputs, two groups
    "gpt_neox": ("gpt_neox.layers", (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                                     ("mlp.dense_4h_to_h",))),
    "gpt2": ("transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))),  # Conv1D
}
FAMILIES = sorted(EXPECTED)


def tiny(family, layers=2, attn=None, **extra):
    loader = TinyModel(family, num_layers=layers)
    cfg = loader.config()
    for k, v in extra.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, **({"attn_implementation": attn} if attn else {})).eval()
    conv1d_to_linear(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_groups_are_the_families_groups(family):
    blocks, groups = EXPECTED[family]
    model = tiny(family)
    found = discover(model.config)
    assert (found.blocks, found.groups) == (blocks, groups)
    assert found.discovered and found.family == model.config.model_type
    if family in _ADAPTERS:  # the hand-written entry (kept for its shortcuts) agrees with the trace
        assert (_ADAPTERS[family].blocks, _ADAPTERS[family].groups) == (blocks, groups)
    block = model.get_submodule(blocks)[0]
    linears = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
    assert sorted(n for g in found.groups for n in g) == linears  # every Linear once
    # the modules found around the blocks are the ones the model calls there: embeddings in, logits out
    assert model.get_input_embeddings() in [model.get_submodule(p) for p in found.inputs]
    assert found.outputs[-1] == "lm_head" and model.get_submodule("lm_head") is model.get_output_embeddings()


def _final_hidden(model, adapter, ids):
    """The last block's outputs, as the model computes them (the input of its final norm)."""
    got = {}
    norm = model.get_submodule(adapter.outputs[0])
    h = norm.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got["x"]


@pytest.mark.parametrize("family,attn", [(f, None) for f in FAMILIES] + [("gpt2", "eager"), ("gpt_neox", "eager")])
def test_engine_runs_each_block_as_the_model_does(family, attn):
    """The engine's block-by-block outputs equal the model's own forward. Gemma 3 here alternates
    sliding-window (window 4 < 16 tokens) and global layers, which get their own masks and rotary:
    with block 0's kwargs for every block the global layers would see a sliding window. GPT-2 passes
    its mask by position, and with eager attention the mask is its only causal mask."""
    extra = {}
    if family == "gemma3_text":
        extra = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = tiny(family, layers=3, attn=attn, **extra)
    adapter = adapter_for(model)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    want = _final_hidden(model, adapter, ids)
    out = SequentialEngine("cpu", max_memory=None, progress=False).run(model, ids, [], keep_outputs=True)["outputs"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _nm_exact(w, n=2, m=4):
    return bool(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) >= n).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compresses_every_linear(family):
    """SparseGPT 2:4 + GPTQ W4: every Linear of every block compressed with an exact 2:4 pattern; GPTQ
    W3 has a lower output error than RTN W3 on every layer (both measured through the same Hessian)."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    model = tiny(family)
    adapter = adapter_for(model)
    names = [n for n, _ in adapter.named_linears(model)]
    all_linears = [f"{adapter.blocks}.{i}.{n}" for i, b in enumerate(adapter.block_list(model))
                   for n, m in b.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(names) == sorted(all_linears)
    SequentialEngine("cpu", max_memory=None, progress=False).run(
        model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=32)])
    for name, lin in adapter.named_linears(model):
        assert _nm_exact(lin.weight), name
        assert layer_state(lin).quant is not None, name
    errs = {}
    for stage in (GPTQ(bits=3, group_size=32), RTN(bits=3, group_size=32)):
        m = tiny(family)
        SequentialEngine("cpu", max_memory=None, progress=False, layer_error=True).run(m, ids, [stage])
        errs[type(stage).__name__] = [layer_state(lin).rel_error for _, lin in adapter_for(m).named_linears(m)]
    assert all(g < r for g, r in zip(errs["GPTQ"], errs["RTN"])), errs


def test_conv1d_becomes_the_same_linear():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TinyModel("gpt2").config()).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert conv1d_to_linear(model) == 4 * 2  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert conv1d_to_linear(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,match", [
    ("mamba", "weights of more than 2-D"), ("t5", "cannot build it as a causal LM"),
])
def test_what_cannot_work_says_why(family, match):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family, vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, d_model=64, num_layers=2)
    with pytest.raises(ConfigError, match=f"unsupported architecture '{family}'.*{match}"):
        discover(cfg)


class _Post(nn.Module):  # an MLP, then one more Linear
    def __init__(self, mlp):
        super().__init__()
        self.inner, self.post = mlp, nn.Linear(64, 64, device="meta")

    def forward(self, x):
        return self.post(self.inner(x))


def test_blocks_of_different_layouts_get_their_own_groups(monkeypatch):
    """A block that calls one more Linear (as DeepSeek-V3's dense first layers differ from its MoE ones):
    the groups are the union, each block's order kept; the others skip the group they lack."""
    from compresslab.models import discover as D

    build = D.meta_twin

    def odd_twin(config):
        twin = build(config)
        twin.model.layers[1].mlp = _Post(twin.model.layers[1].mlp)
        return twin

    monkeypatch.setattr(D, "meta_twin", odd_twin)
    model = tiny("qwen3", layers=3)
    adapter = discover(model.config)
    mlp = (("mlp.inner.gate_proj", "mlp.inner.up_proj"), ("mlp.inner.down_proj",), ("mlp.post",))
    assert adapter.groups == LLAMA_LIKE[:2] + mlp + LLAMA_LIKE[2:]  # block 1's MLP groups, then the others'
    model.model.layers[1].mlp = _Post(model.model.layers[1].mlp).to_empty(device="cpu")
    got = [tuple(tuple(n for n, _ in g) for g in adapter.linear_groups(b)) for b in model.model.layers]
    assert got == [LLAMA_LIKE, LLAMA_LIKE[:2] + mlp, LLAMA_LIKE]


def test_blocks_that_group_the_same_linears_differently_fail(monkeypatch):
    from compresslab.models import discover as D

    build = D.meta_twin

    def odd_twin(config):  # block 2's q_proj reads its own input: no group list fits both
        twin = build(config)
        attn = twin.model.layers[2].self_attn
        q = attn.q_proj
        attn.q_proj = type("Q", (nn.Module,), {"forward": lambda self, x: self.lin(x.clone())})()
        attn.q_proj.lin = q
        return twin

    monkeypatch.setattr(D, "meta_twin", odd_twin)
    with pytest.raises(ConfigError, match="unsupported architecture 'qwen3': its blocks group the same Linears differently"):
        discover(tiny("qwen3", layers=3).config)


@needs_data
def test_run_py_compresses_saved_families_through_model_hf(tmp_path):
    """One sweep over checkpoints saved to disk (byte tokenizer) for every family, gptq or rtn W3: every
    job ok, ppl finite, every block Linear in the per-layer table, and GPTQ below RTN on every layer
    (engine.layer_error: both measured through the same Hessian). Exact 2:4 masks on every family are
    checked in-process above."""
    import subprocess
    import sys

    from test_sweeps import ROOT, records

    folders = []
    for family in FAMILIES:
        model = tiny(family)
        if family == "gpt2":  # saved as transformers writes it: Conv1D, (in, out) weights
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(TinyModel("gpt2").config()).eval()
        folder = tmp_path / "ckpt" / family
        model.save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    sweep = tmp_path / "sweep"
    data = small_data_dir(tmp_path / "data")
    args = [sys.executable, str(ROOT / "run.py"), "-m", "model=hf", f"model.name_or_path={','.join(folders)}",
            "quantizer=gptq,rtn", "quantizer.bits=3",
            "quantizer.group_size=32", "data.nsamples=4", "data.seqlen=32", "eval.seqlen=64", "eval.max_windows=2",
            "engine.layer_error=true", "logger=none", "engine.progress=false", "eval.progress=false",
            f"hydra.sweep.dir={sweep}"]
    import os

    env = {**os.environ, "COMPRESSLAB_DATA_DIR": str(data), "TQDM_DISABLE": "1"}
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = list(records(sweep).values())
    assert len(recs) == 2 * len(FAMILIES)
    bad = {r["config"]["model"]["name_or_path"]: r["error"] for r in recs if r["status"] != "ok"}
    assert not bad, bad
    by = {}
    for r in recs:
        family = r["config"]["model"]["name_or_path"].rsplit("/", 1)[-1]
        assert math.isfinite(r["metrics"]["ppl/wikitext2"]), family
        blocks, groups = EXPECTED[family]
        want = sorted(f"{blocks}.{i}.{n}" for i in range(2) for g in groups for n in g)
        assert sorted(row["name"] for row in r["layers"]) == want, family
        by.setdefault(family, {})[r["choices"]["quantizer"]] = {row["name"]: row["rel_error"] for row in r["layers"]}
    assert len(by) == len(FAMILIES)
    for family, errs in by.items():
        assert all(errs["gptq"][n] < errs["rtn"][n] for n in errs["gptq"]), (family, errs)


def test_conv1d_families_refuse_what_cannot_hold_them(tmp_path):
    """GPT-2 style checkpoints: streaming from disk would read (in, out) shards into Linears, and
    compressed-tensors export has no Conv1D; both fail with the reason."""
    from transformers import AutoModelForCausalLM

    from compresslab.export import export_compressed_tensors
    from compresslab.models.loaders import HFModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TinyModel("gpt2").config()).eval()
    model.save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="cannot stream GPT-2 style Conv1D layers"):
        HFModel(str(tmp_path / "gpt2"), offload="disk").load_streamed()
    loaded, _ = HFModel(str(tmp_path / "gpt2"), device="cpu").load()
    assert not any(type(m).__name__ == "Conv1D" for m in loaded.modules())
    SequentialEngine("cpu", max_memory=None, progress=False).run(loaded, None, [RTN(bits=4, group_size=32, grid="sym")])
    with pytest.raises(ConfigError, match="Conv1D layers, which compressed-tensors does not quantize"):
        export_compressed_tensors(loaded, tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma3_text", "falcon", "gpt2", "phi3"])
def test_chunked_path_sees_the_one_pass_inputs(family):
    """The memory plan's chunked path (chunks of 2 of 5 samples, the last one short) hands every group
    of a traced family the Hessian the one pass does (that the one pass runs each block as the model
    does is checked above)."""
    from conftest import Recorder

    extra = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]) \
        if family == "gemma3_text" else {}
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(3))
    seen = {}
    for chunk in (None, 2):
        rec = Recorder()
        SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False).run(tiny(family, 3, **extra), ids,
                                                                                       [rec])
        seen[chunk] = rec.calls
    assert [n for n, _ in seen[None]] == [n for n, _ in seen[2]]
    for (name, (h1, _)), (_, (h2, _)) in zip(seen[None], seen[2]):
        torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-6 * float(h1.abs().max()), msg=name)
