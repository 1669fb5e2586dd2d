"""The diagonal Fisher pass (fisher.py) and its delivery to stages (needs={"fisher"})."""

import copy

import pytest
import torch

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.fisher import fisher_diagonal
from compresslab.models.adapters import adapter_for
from compresslab.models.loaders import TinyModel


def tiny(layers=2, dtype=torch.float32):
    model, _ = TinyModel(family="llama", num_layers=layers, device="cpu").load()
    return model.to(dtype)


def window_loss(model, ids):
    """Mean next-token cross-entropy, in float64 (HF's own loss upcasts only to float32)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def test_fisher_matches_finite_differences_per_window():
    """F_ij = mean over windows of (dℓ_s/dW_ij)², each derivative by central differences in float64 (a wide
    step: HF's RMSNorm and rotary run in float32 whatever the model's dtype, which caps the loss's precision)."""
    model = tiny(dtype=torch.float64)
    ids = torch.randint(0, 256, (3, 12))
    linears = list(adapter_for(model).named_linears(model))
    fisher, n = fisher_diagonal(model, ids, linears)
    assert n == 3 and set(fisher) == {name for name, _ in linears}
    eps = 3e-2
    for name, (i, j) in [(linears[0][0], (1, 2)), (linears[-1][0], (3, 5)), (linears[4][0], (0, 7))]:
        lin = dict(linears)[name]
        sq = 0.0
        for s in range(3):
            w0 = lin.weight.data[i, j].item()
            lin.weight.data[i, j] = w0 + eps
            up = window_loss(model, ids[s:s + 1])
            lin.weight.data[i, j] = w0 - eps
            down = window_loss(model, ids[s:s + 1])
            lin.weight.data[i, j] = w0
            sq += ((up - down) / (2 * eps)) ** 2
        assert fisher[name][i, j].item() == pytest.approx(sq / 3, rel=2e-2)


def test_fisher_pass_leaves_the_model_as_it_was():
    model = tiny()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    fisher_diagonal(model, torch.randint(0, 256, (2, 8)), list(adapter_for(model).named_linears(model)))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class FisherRecorder:
    needs = frozenset({"fisher"})

    def __init__(self):
        self.seen = {}

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        self.seen[name] = stats.fisher_of(name).clone()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_engine_gives_each_linear_its_own_fisher(chunk_size):
    model = tiny()
    ids = torch.randint(0, 256, (4, 16))
    twin = copy.deepcopy(model)
    expected, _ = fisher_diagonal(twin, ids, list(adapter_for(twin).named_linears(twin)))
    rec = FisherRecorder()
    SequentialEngine(device="cpu", chunk_size=chunk_size, progress=False).run(model, ids, [rec])
    assert set(rec.seen) == set(expected)
    for name, F in expected.items():
        torch.testing.assert_close(rec.seen[name], F)  # the dense model's, not a compressed one's


def test_stacked_names_give_stacked_rows():
    from compresslab.stats import LayerStats

    stats = LayerStats({"fisher"}, 4)
    stats.add_batch(torch.randn(3, 4))
    a, b = torch.rand(2, 4), torch.rand(5, 4)
    stats.attach_fisher({"x.q": a, "x.k": b})
    torch.testing.assert_close(stats.fisher_of("x.q + x.k"), torch.cat([a, b]))
    with pytest.raises(RuntimeError, match="no Fisher information for x.v"):
        stats.fisher_of("x.v")


def test_streamed_model_refuses_fisher_before_loading(tmp_path):
    from compresslab.pipeline import Pipeline

    from compresslab.lowrank.fwsvd import FWSVD

    class Loader:
        offload = "disk"

    p = Pipeline.__new__(Pipeline)
    p.model_loader, p.pruner, p.quantizer, p.lowrank = Loader(), None, None, FWSVD(rank=4)
    p.save, p.evaluator, p.recovery, p.rotation, p.allocation = {"path": str(tmp_path)}, None, None, None, None
    with pytest.raises(ConfigError, match="Fisher"):
        p._check_streamed()
