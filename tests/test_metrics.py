import json

import pytest
import torch

from compresslab.metrics import compression_summary, write_json_atomic
from compresslab.models.loaders import TinyModel
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.rtn import RTN
from compresslab.engine import SequentialEngine


@pytest.mark.parametrize("pruner,quant,bits", [
    (None, None, 16.0),
    (Magnitude(0.5, "2:4"), None, 0.5 * (16 + 2)),
    (Magnitude(0.5), None, 1 + 0.5 * 16),  # unstructured: a 1-bit mask + the kept fp16 values
    (None, RTN(bits=3, group_size=32), 3 + 19 / 32),
    (Magnitude(0.5, "4:8"), RTN(bits=4, group_size=16, grid="sym"), 0.5 * (4 + 3) + 16 / 16),
])
def test_avg_bits_and_sparsity(pruner, quant, bits):
    model, _ = TinyModel(device="cpu").load()
    SequentialEngine(device="cpu", progress=False).run(model, None, [pruner, quant])
    summary, layers = compression_summary(model)
    assert summary["avg_bits"] == pytest.approx(bits)
    pruned = sum(int((r["sparsity"] * r["shape"][0] * r["shape"][1]) + 0.5) for r in layers)
    assert summary["sparsity"] == pytest.approx(pruned / summary["params/compressed"])
    # sparsity is what the pruner removed, exactly; quantization may round more weights to 0
    assert summary["sparsity"] == (0.5 if pruner is not None else 0.0)
    zeros = sum(int((model.get_submodule(r["name"]).weight == 0).sum()) for r in layers)
    assert summary["zero_fraction"] == pytest.approx(zeros / summary["params/compressed"])
    if quant is not None:
        assert summary["zero_fraction"] > summary["sparsity"]  # 3-4 bit grids put some weights on 0
    assert len(layers) == 2 * 7


def test_write_json_atomic(tmp_path):
    p = write_json_atomic(tmp_path / "a" / "m.json", {"x": torch.tensor(1.0).item(), "y": [1, 2]})
    assert json.loads(p.read_text()) == {"x": 1.0, "y": [1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]


def test_fault_in_makes_a_lazily_mapped_checkpoint_resident(tmp_path):
    """safetensors maps tensors lazily: a 64 MiB weight costs no RSS until read; after fault_in the
    module's pages are resident (what memory/rss_after_load_gb counts)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compresslab.metrics import current_rss_gb, fault_in

    save_file({"w": torch.ones(4096, 4096)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        w = f.get_tensor("w")
    lin = torch.nn.Linear(4096, 4096, bias=False)
    del lin.weight
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    before = current_rss_gb()
    fault_in(lin)
    grew = current_rss_gb() - before
    assert 0.05 < grew < 0.08  # the 0.0625 GiB weight
