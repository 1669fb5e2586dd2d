import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compresslab.models import adapters
from compresslab.models.adapters import adapter_for


def llama_block(act="silu"):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=64, hidden_act=act)
    return LlamaForCausalLM(cfg).eval()


def mlp_io(mlp, x, lean_ctx):
    """The MLP's output and the input every Linear saw, under `lean_ctx`."""
    seen = {}
    hooks = [getattr(mlp, n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].clone()))
             for n in ("gate_proj", "up_proj", "down_proj")]
    with lean_ctx:
        y = mlp(x)
    for h in hooks:
        h.remove()
    return y, seen


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "relu"])
def test_lean_mlp_is_the_family_forward_to_the_bit(monkeypatch, act):
    monkeypatch.setattr(adapters, "LEAN_ROWS", 7)  # slices that do not divide the 3 x 10 rows
    model = llama_block(act)
    block = model.model.layers[0]
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        ref, ref_seen = mlp_io(block.mlp, x, torch.no_grad())
        out, seen = mlp_io(block.mlp, x, adapter_for(model).lean(block))
    assert torch.equal(out, ref)
    assert seen.keys() == ref_seen.keys()
    for n in seen:
        assert [torch.equal(a, b) for a, b in zip(seen[n], ref_seen[n])] == [True] * len(ref_seen[n])
    assert "forward" not in vars(block.mlp)  # the family's forward is back


def test_lean_mlp_runs_the_family_forward_when_training():
    model = llama_block()
    block = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    ref_grad = torch.autograd.grad(block.mlp(x).square().sum(), block.mlp.gate_proj.weight)[0]
    with adapter_for(model).lean(block):
        g = torch.autograd.grad(block.mlp(x).square().sum(), block.mlp.gate_proj.weight)[0]
    torch.testing.assert_close(g, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("hook_up,lean_peak", [(False, 1), (True, 2)])
def test_lean_mlp_holds_fewer_intermediate_tensors(monkeypatch, hook_up, lean_peak):
    """Count (tokens, intermediate) tensors alive at once through torch's dispatch: the family's
    forward peaks at three (act(gate), up, their product), the lean one at one (up in row slices), or
    at two when a hook on up must see its whole input."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import weakref

    monkeypatch.setattr(adapters, "LEAN_ROWS", 16)  # the activation's temporaries: a quarter of the rows
    model = llama_block()
    block = model.model.layers[0]
    x = torch.randn(4, 16, 32)
    if hook_up:
        block.mlp.up_proj.register_forward_pre_hook(lambda m, a: None)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.shape[-1] == 48 and t.numel() == 4 * 16 * 48 \
                        and t._base is None:
                    self.live.append(weakref.ref(t))
            self.live = [r for r in self.live if r() is not None]
            self.peak = max(self.peak, len({r().untyped_storage().data_ptr() for r in self.live}))
            return out

    with torch.no_grad():
        with Count() as plain:
            block.mlp(x)
        with adapter_for(model).lean(block), Count() as lean:
            block.mlp(x)
    assert (plain.peak, lean.peak) == (3, lean_peak)


def test_lean_mlp_slices_up_when_nothing_hooks_it(monkeypatch):
    monkeypatch.setattr(adapters, "LEAN_ROWS", 8)
    model = llama_block()
    block = model.model.layers[0]
    x = torch.randn(3, 10, 32)
    calls = []
    orig = block.mlp.up_proj.forward
    monkeypatch.setattr(block.mlp.up_proj, "forward", lambda t: (calls.append(t.shape[:-1].numel()), orig(t))[1])
    with torch.no_grad():
        ref = block.mlp(x)
        calls.clear()
        with adapter_for(model).lean(block):
            out = block.mlp(x)
    assert calls == [8, 8, 8, 6]  # row slices of the 30 tokens
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
