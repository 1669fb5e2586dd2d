"""compressed-tensors export: plain transformers loads it on the CPU with the same logits."""

import pytest
import torch

from compresslab import compress
from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.export import export_compressed_tensors
from compresslab.lowrank.naive import NaiveSVD
from compresslab.models.loaders import TinyModel
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.absmax import AbsMax
from compresslab.quantizer.gptq import GPTQ
from compresslab.quantizer.rtn import RTN


def _compressed(**stages):
    model, tok = TinyModel(device="cpu").load()
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    compress(model, tok, calibration=ids, engine=SequentialEngine("cpu", progress=False), **stages)
    return model


@pytest.mark.parametrize("stages", [
    {"quantizer": RTN(bits=4, group_size=32, grid="sym")},
    {"pruner": Wanda(sparsity=0.5, pattern="2:4"), "quantizer": GPTQ(bits=4, group_size=32, grid="sym")},
    {"quantizer": AbsMax(bits=4, group_size=32)},
], ids=["rtn-w4-g32", "wanda24-gptq-w4", "absmax-w4-g32"])
def test_export_loads_in_plain_transformers_with_same_logits(stages, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _compressed(**stages)
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
    export_compressed_tensors(model, tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert '"pack-quantized"' in cfg and '"quant_method": "compressed-tensors"' in cfg
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if "pruner" in stages:  # 2:4 zeros survive (stored, not compacted)
        w = loaded.model.layers[0].mlp.up_proj.weight
        assert (w.reshape(-1, 4) != 0).sum(-1).max() <= 2


def test_what_the_format_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="symmetric grid"):
        export_compressed_tensors(_compressed(quantizer=RTN(bits=4, group_size=32)), tmp_path)
    with pytest.raises(ConfigError, match="low-rank adapters"):
        export_compressed_tensors(_compressed(quantizer=RTN(bits=4, group_size=32, grid="sym"),
                                              lowrank=NaiveSVD(rank=4)), tmp_path)
    with pytest.raises(ConfigError, match="not quantized"):
        export_compressed_tensors(_compressed(pruner=Wanda(sparsity=0.5, pattern="2:4")), tmp_path)


def test_rotated_model_exports_without_the_online_hadamard(tmp_path):
    """QuaRot with online_down=false leaves plain Linears (rotated weights, norms of ones, an untied head):
    compressed-tensors holds it and plain transformers gives the same logits."""
    from transformers import AutoModelForCausalLM

    from compresslab.rotation.quarot import QuaRot

    model, tok = TinyModel(device="cpu").load()
    QuaRot(online_down=False).apply(model)
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    compress(model, tok, calibration=ids, engine=SequentialEngine("cpu", progress=False),
             quantizer=GPTQ(bits=4, group_size=32, grid="sym"))
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
    export_compressed_tensors(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
