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
