"""scripts/gpu_check.py's CPU dry run: argument checks, the random model builder, every check's code
path at tiny sizes (cuda-only ones report "skipped"), and the table writer. The GPU run itself is
scripts/gpu-check.sh on a lent GPU."""

import importlib.util
import json

import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.parametrize("bad,message", [
    (["--only", "nosuch"], "unknown checks ['nosuch']"),
    (["--layers", "0"], "--layers and --nsamples must be >= 1"),
    (["--shape", "huge"], "invalid choice: 'huge'"),
])
def test_bad_arguments_fail_with_the_reason(bad, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args([*bad, "--device", "cpu"])
    assert message in capsys.readouterr().err


def test_arguments():
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])  # cuda by default: refused where there is none
    args = gpu_check.parse_args(["--device", "cpu", "--shape", "tiny"])
    assert args.dtype == torch.float32 and args.layers == 4 and args.nsamples == 128


def test_random_llama_has_the_shape():
    m = gpu_check.random_llama("tiny", 3, torch.float32)
    s = gpu_check.SHAPES["tiny"]
    assert len(m.model.layers) == 3
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (s["intermediate_size"], s["hidden_size"])
    kv = s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (kv, s["hidden_size"])
    assert m.lm_head.weight.shape == (s["vocab_size"], s["hidden_size"])


def test_dry_run_on_the_cpu(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--shape", "tiny", "--layers", "2", "--nsamples", "4", "--seqlen", "32",
                         "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    results = {r["check"]: r["result"] for r in rec["rows"]}
    assert rc == 0 and list(results) == list(gpu_check.CHECKS)
    cuda_only = {"obs_block_sweep", "plan_hidden_on_host", "kernels", "distributed"}
    assert {k for k, v in results.items() if v == "skipped"} == cuda_only
    assert all(v == "ok" for k, v in results.items() if k not in cuda_only)
    shapes = next(r for r in rec["rows"] if r["check"] == "engine_shapes")["detail"]
    assert shapes["sparsegpt24_gptq"]["sparsity"] == 0.5 and shapes["gptq"]["sparsity"] == 0
    # extrapolated to the shape's full depth (4 for tiny), not to the --layers 2 that ran
    assert "est_4_layers_s" in shapes["gptq"] and "est_2_layers_s" not in shapes["gptq"]
    md = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert md[0] == "# GPU check" and sum(line.startswith("| ") for line in md) == 1 + len(gpu_check.CHECKS)


def test_table_writer_escapes_pipes(tmp_path):
    rows = [{"check": "a", "result": "FAIL", "detail": "x | y", "seconds": 1.0}]
    text = gpu_check.write_table(rows, tmp_path, {"device": "cpu"}).read_text()
    assert "| a | FAIL | x / y | 1.0 |" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"] == rows
