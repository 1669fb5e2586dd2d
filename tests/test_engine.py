import copy

import pytest
import torch
from torch import nn

from compresslab.engine import SequentialEngine
from compresslab.models.adapters import adapter_for
from compresslab.models.loaders import TinyModel
from conftest import Recorder


def tiny(family, **kw):
    model, _ = TinyModel(family=family, num_layers=3, device="cpu", **kw).load()
    return model


def last_block_output(model, ids):
    """Hidden states leaving the last block in a plain full-model forward."""
    blocks = adapter_for(model).block_list(model)
    seen = {}
    h = blocks[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return seen["out"]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_identity_matches_full_forward(family, chunk_size):
    model = tiny(family)
    ids = torch.randint(0, 256, (5, 32))
    ref = last_block_output(model, ids)
    rec = Recorder()
    res = SequentialEngine(device="cpu", chunk_size=chunk_size, progress=False).run(model, ids, [rec], keep_outputs=True)
    torch.testing.assert_close(res["outputs"], ref, atol=1e-5, rtol=1e-5)
    # every target Linear was visited once, in true-sequential order
    names = [n for n, _ in rec.calls]
    expected = [n for n, _ in adapter_for(model).named_linears(model)]
    assert names == expected


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_statistics_match_brute_force(chunk_size):
    model = tiny("llama")
    ids = torch.randint(0, 256, (4, 16))
    xs = {}
    q = model.model.layers[1].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj

    def grab(key):
        def hook(mod, args):
            xs.setdefault(key, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [m.register_forward_pre_hook(grab(k)) for k, m in (("q1", q), ("down0", down))]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    rec = Recorder()
    SequentialEngine(device="cpu", chunk_size=chunk_size, progress=False).run(model, ids, [rec])
    stats = dict(rec.calls)
    for key, name in (("q1", "model.layers.1.self_attn.q_proj"), ("down0", "model.layers.0.mlp.down_proj")):
        X = xs[key].double()
        H, norm = stats[name]
        torch.testing.assert_close(H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.double(), X.norm(dim=0), rtol=1e-4, atol=1e-5)
    # q, k, v share one input: the same statistics object values
    torch.testing.assert_close(stats["model.layers.0.self_attn.q_proj"][0], stats["model.layers.0.self_attn.v_proj"][0])


class DropWeakestInput:
    """A data-dependent toy stage: zero the input column with the smallest ‖X_j‖."""

    needs = frozenset({"act_norm"})

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        layer.weight.data[:, stats.act_norm.argmin()] = 0


def test_one_pass_and_sequential_agree_and_are_true_sequential():
    ids = torch.randint(0, 256, (4, 16))
    a, b = tiny("llama"), tiny("llama")
    SequentialEngine(device="cpu", progress=False).run(a, ids, [DropWeakestInput()])
    SequentialEngine(device="cpu", chunk_size=1, progress=False).run(b, ids, [DropWeakestInput()])
    for (n, la), (_, lb) in zip(adapter_for(a).named_linears(a), adapter_for(b).named_linears(b)):
        torch.testing.assert_close(la.weight, lb.weight, msg=n)


def test_weight_only_stages_skip_calibration():
    class Halve:
        needs = frozenset()

        def check(self, name, layer):
            pass

        def compress(self, name, layer, stats):
            assert stats is None
            layer.weight.data *= 0.5

    model = tiny("opt")
    before = copy.deepcopy(model)
    SequentialEngine(device="cpu", progress=False).run(model, None, [Halve()])
    for (_, l1), (_, l0) in zip(adapter_for(model).named_linears(model), adapter_for(before).named_linears(before)):
        torch.testing.assert_close(l1.weight, 0.5 * l0.weight)


def test_unsupported_architecture():
    from compresslab.errors import ConfigError

    class Odd(nn.Module):
        class config:
            model_type = "mamba"

    with pytest.raises(ConfigError, match="unsupported architecture 'mamba'.*add an adapter"):
        SequentialEngine(device="cpu").run(Odd(), None, [])


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_engine_outputs_match_compressed_model_with_activation_quant(chunk_size):
    """Propagated calibration activations are those of the compressed model, act-quant hooks included
    (in one-pass mode the hook attached during a Linear's own pre-hook applies from that call on)."""
    from compresslab.quantizer.gptq import GPTQ

    model = tiny("llama")
    ids = torch.randint(0, 256, (4, 32))
    q = GPTQ(bits=4, group_size=32, act_bits=4, act_granularity="token")
    res = SequentialEngine(device="cpu", chunk_size=chunk_size, progress=False).run(model, ids, [q], keep_outputs=True)
    torch.testing.assert_close(res["outputs"], last_block_output(model, ids), atol=1e-5, rtol=1e-5)
    lin = adapter_for(model).block_list(model)[0].self_attn.q_proj
    assert len(lin._forward_pre_hooks) == 1  # the act-quant hook, once


def test_engine_outputs_include_low_rank_adapters():
    """In one-pass mode an adapter attached while its Linear is being called applies in that call."""
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.quantizer.gptq import GPTQ

    model = tiny("llama")
    ids = torch.randint(0, 256, (4, 32))
    res = SequentialEngine(device="cpu", progress=False).run(
        model, ids, [GPTQ(bits=2, group_size=32), SLiMLoRA(rank=4)], keep_outputs=True)
    torch.testing.assert_close(res["outputs"], last_block_output(model, ids), atol=1e-5, rtol=1e-5)
    assert adapter_for(model).block_list(model)[0].mlp.down_proj.lora_A.shape[0] == 4


def direct_errors(model, dense, ids):
    """‖(W_d − Ŵ)X‖ / ‖W_d X‖ per Linear, X captured in a plain forward of the final compressed model:
    written from the definition, without the engine's Hessians or its ErrorMeter."""
    from compresslab.stages import effective_weight

    xs = {}
    named = dict(adapter_for(model).named_linears(model))
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: xs.setdefault(n, []).append(a[0].detach()))
             for n, lin in named.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for n, lin in named.items():
        X = torch.cat(xs[n]).reshape(-1, lin.in_features)
        Wd = dense.get_submodule(n).weight.detach()
        out[n] = float((X @ (Wd - effective_weight(lin)).T).norm() / (X @ Wd.T).norm())
    return out


@pytest.mark.parametrize("recovery", [None, "beam", "finetune"])
def test_rel_error_is_measured_on_the_final_layers(recovery):
    """Without recovery the Hessian-based error equals the direct one (the one-pass forward's inputs are
    the final model's); after BEAM or finetune the reported error is that of the trained layers (the
    one-shot value kept as rel_error_oneshot), again equal to the direct one."""
    import copy

    from compresslab import compress
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.recovery.beam import Beam
    from compresslab.recovery.finetune import Finetune

    model = tiny("llama")
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(3))
    rec = {None: None, "beam": Beam(epochs=4, lr=1e-3, batch_size=4),
           "finetune": Finetune(steps=4, seqlen=32, batch_size=2, lr=1e-2)}[recovery]
    report = compress(model, quantizer=GPTQ(bits=2, group_size=32), lowrank=SLiMLoRA(rank=4), recovery=rec,
                      calibration=ids, engine=SequentialEngine("cpu", progress=False))
    want = direct_errors(model, dense, ids)
    rows = {r["name"]: r for r in report.layers}
    changed = 0
    for n, err in want.items():
        assert rows[n]["rel_error"] == pytest.approx(err, rel=2e-3), n
        if recovery is None:
            assert "rel_error_oneshot" not in rows[n]
        else:
            changed += rows[n]["rel_error_oneshot"] != pytest.approx(err, rel=1e-3)  # training changed it
    if recovery == "beam":
        trained = [r["block"] for r in report.recovery if r["kept"] == "trained"]
        assert trained and changed >= 7 * len(trained) // 2, (trained, changed)
    elif recovery == "finetune":
        assert changed == len(want)


def test_recover_with_finetune_measures_against_the_dense_model(monkeypatch):
    """recover(dense, compressed, finetune): the errors are those of the trained layers against the DENSE
    model's weights (not against the compressed weights the engine saw), through a meter that works in
    row chunks (set tiny here) and a forward that stops before the output head (no logits)."""
    from compresslab import compress, recover
    from compresslab.layer_error import ErrorMeter
    from compresslab.quantizer.rtn import RTN
    from compresslab.recovery.finetune import Finetune

    monkeypatch.setattr(ErrorMeter, "CHUNK_ELEMENTS", 100)
    model = tiny("llama")
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(4))
    engine = SequentialEngine("cpu", progress=False)
    compress(model, quantizer=RTN(bits=2, group_size=32), engine=engine)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    during = []

    def measure(*a, **k):
        n = len(head_calls)
        SequentialEngine.measure_model(engine, *a, **k)
        during.append(len(head_calls) - n)

    engine.measure_model = measure
    report = recover(dense, model, recovery=Finetune(steps=2, seqlen=32, batch_size=2, lr=1e-3),
                     calibration=ids, engine=engine)
    want = direct_errors(model, dense, ids)
    rows = {r["name"]: r for r in report.layers}
    for n, err in want.items():
        assert err > 0.05, n  # 2-bit RTN: far from the dense weights
        assert rows[n]["rel_error"] == pytest.approx(err, rel=2e-3), n
    assert head_calls and during == [0]  # the finetune's steps call the head; the measurement does not


def _count_calls(block):
    calls = {"attn": 0, "mlp": 0}

    def count(key):
        def hook(mod, args, kwargs=None):
            calls[key] += 1
        return hook

    hooks = [block.self_attn.register_forward_pre_hook(count("attn")), block.mlp.register_forward_pre_hook(count("mlp"))]
    return calls, hooks


@pytest.mark.parametrize("writer,keep_p", [(True, True), (True, False), (False, False)])
def test_chunked_llama_runs_the_attention_only_for_its_own_groups(monkeypatch, writer, keep_p):
    """Chunked path on a block that ends in h + mlp(norm(h)): the residual h is kept once the attention
    groups are done, so the MLP runs for gate/up, down and the outputs only (3 calls per chunk). With the
    residual writer (h = x + o_proj(a)) the o group's pass keeps a and h is computed from it: the
    attention runs for the q/k/v and o groups only (2 calls per chunk); without it once more to reach h
    (3). With down's input p kept (no budget: the plan keeps it) the outputs are h + down(p): the MLP
    runs for gate/up and down only (2). The outputs match the model's."""
    import dataclasses

    from compresslab.models import adapters

    adapter = adapters._LLAMA
    if not keep_p:
        adapter = dataclasses.replace(adapter, residual_mlp_out=None)
    if not writer:
        adapter = dataclasses.replace(adapter, residual_attn=None)
    monkeypatch.setitem(adapters._ADAPTERS, "llama", adapter)
    model = tiny("llama")
    ids = torch.randint(0, 256, (6, 16))
    ref = last_block_output(model, ids)
    calls, hooks = _count_calls(model.model.layers[0])
    rec = Recorder()
    res = SequentialEngine(device="cpu", chunk_size=2, progress=False).run(model, ids, [rec], keep_outputs=True)
    for h in hooks:
        h.remove()
    assert res["plan"].keep_mlp_input == keep_p
    assert calls == {"attn": (2 if writer else 3) * 3, "mlp": (2 if keep_p else 3) * 3}
    torch.testing.assert_close(res["outputs"], ref, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in rec.calls] == [n for n, _ in adapter_for(model).named_linears(model)]


def test_chunked_residual_writer_uses_the_compressed_o_proj(monkeypatch):
    """h = x + o(a) from the kept input a and the outputs h + down(p) from the kept input p, o and down
    as compressed, equal what running the block again gives: GPTQ W3 through the chunked path with and
    without the two shortcuts gives the same weights in every block and the same outputs."""
    import dataclasses

    from compresslab.models import adapters
    from compresslab.quantizer.gptq import GPTQ

    model = tiny("llama")
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    outs, weights = [], []
    for adapter in (adapters._LLAMA, dataclasses.replace(adapters._LLAMA, residual_attn=None, residual_mlp_out=None)):
        monkeypatch.setitem(adapters._ADAPTERS, "llama", adapter)
        m = copy.deepcopy(model)
        res = SequentialEngine(device="cpu", chunk_size=2, progress=False).run(
            m, ids, [GPTQ(bits=3, group_size=16)], keep_outputs=True)
        outs.append(res["outputs"])
        weights.append({n: p.detach().clone() for n, p in m.named_parameters() if "proj" in n})
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # both were compressed
        assert not torch.equal(weights[0][f"model.layers.0.{name}.weight"], model.get_submodule(f"model.layers.0.{name}").weight)
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=0, rtol=0, msg=n)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
