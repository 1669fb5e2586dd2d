"""The Python API and the CLI give the same result for the same settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compresslab import compress, evaluate
from compresslab.eval.ppl import Perplexity
from compresslab.models.loaders import TinyModel
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.rtn import RTN
from conftest import needs_data

ROOT = Path(__file__).resolve().parents[1]


@needs_data
def test_api_matches_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "model.device=cpu", "pruner=magnitude", "pruner.pattern=2:4",
         "quantizer=rtn", "quantizer.bits=4", "quantizer.group_size=32", "eval.seqlen=256", "eval.max_windows=3",
         "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"metrics: {tmp_path / 'metrics.json'}"
    cli = json.loads((tmp_path / "metrics.json").read_text())
    assert cli["status"] == "ok" and cli["error"] is None
    assert cli["config"]["quantizer"]["group_size"] == 32
    assert {"python", "torch", "transformers", "git_sha", "device"} <= set(cli["env"])

    model, tok = TinyModel(device="cpu").load()
    report = compress(model, tok, pruner=Magnitude(0.5, "2:4"), quantizer=RTN(bits=4, group_size=32))
    res = evaluate(model, tok, Perplexity(seqlen=256, max_windows=3, device="cpu", progress=False))
    m = cli["metrics"]
    assert report.metrics["sparsity"] == m["sparsity"]
    assert report.metrics["avg_bits"] == pytest.approx(m["avg_bits"], abs=0)
    assert res["ppl/wikitext2"] == pytest.approx(m["ppl/wikitext2"], rel=1e-6)
    assert m["avg_bits"] == pytest.approx(0.5 * (4 + 2) + (16 + 4) / 32)  # 2:4 values+positions, scale+zero
    for key in ("time/compress_s", "time/eval_s", "memory/peak_rss_gb"):
        assert m[key] > 0


def test_failed_run_writes_metrics(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "quantizer=rtn", "quantizer.group_size=48", "logger=none",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert "group_size=48 does not divide the input width 64" in out.stdout + out.stderr
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["status"] == "failed" and "group_size=48" in rec["error"]
    assert out.stdout.strip().splitlines()[-1].startswith("metrics: ")


def test_compress_needs_calibration_for_data_methods():
    from conftest import Recorder

    model, tok = TinyModel(device="cpu").load()
    with pytest.raises(ValueError, match="calibration"):
        compress(model, tok, pruner=Recorder())
    report = compress(model, tok, pruner=Recorder(), calibration=torch.randint(0, 256, (2, 16)))
    assert report.metrics["sparsity"] == 0.0 and report.metrics["avg_bits"] == 16.0


def test_compress_runs_the_allocation_a_stage_brings_and_an_explicit_one():
    """SVD-LLM V2 with heterogeneous ranks brings its own allocation: the API runs it as the CLI does
    (each Linear gets the rank the allocator computes on the same model and calibration)."""
    from compresslab.allocation.owl import OWL
    from compresslab.allocation.svd_llm_v2 import TruncationLoss
    from compresslab.engine import SequentialEngine
    from compresslab.lowrank.svd_llm_v2 import SVDLLMv2
    from compresslab.pruner.wanda import Wanda

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    model, tok = TinyModel(device="cpu").load()
    want = TruncationLoss("paper").levels(model, ids, [SVDLLMv2(param_ratio=0.8)], SequentialEngine(progress=False))
    model, tok = TinyModel(device="cpu").load()
    report = compress(model, tok, lowrank=SVDLLMv2(param_ratio=0.8), calibration=ids,
                      engine=SequentialEngine(progress=False))
    got = {r["name"]: r["rank"] for r in report.layers}
    assert got == {n: v["rank"] for n, v in want.items()}
    assert len(set(got.values())) > 2 and report.metrics["allocation/met"] <= 0.8

    model, tok = TinyModel(device="cpu").load()
    report = compress(model, tok, pruner=Wanda(0.5), calibration=ids, allocation=OWL(target=0.5),
                      engine=SequentialEngine(progress=False))
    sparsity = {r["name"]: r["sparsity"] for r in report.layers}
    assert len(set(sparsity.values())) > 1  # OWL's per-block ratios, not one uniform 50%
