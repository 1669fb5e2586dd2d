"""The engine on every supported family at equal width: time and memory per parameter against Llama.

    python experiments/bench/families.py [--hidden 256 --layers 4 --samples 16 --seqlen 256 --repeats 3]

Each family (tests/models/test_discover.py's list) runs in its own process: a random-init model from
`TinyModel(family)` (hidden 256, 8 heads, 2 KV heads where the family has them, intermediate 3x),
sparsegpt 2:4 + gptq W4 g64 (one joint pass) on random-token calibration, fp32, CPU. Reported: the
best of `--repeats` compression times, seconds per million block-Linear parameters and its ratio to
Llama's (the issue's bar: no family above 1.5x), peak RSS above the RSS before the engine, and how
the adapter was found (hand-written or traced). Writes experiments/results/families.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import emit, parse_or_run_child, run_child

FAMILIES = ["llama", "mistral", "qwen2", "smollm3", "qwen3", "gemma2", "gemma3_text", "phi3", "falcon", "stablelm",
            "olmo2", "granite", "opt", "gpt_neox", "gpt2"]


def child(spec: dict) -> dict:
    import torch

    from compresslab.engine import SequentialEngine
    from compresslab.metrics import current_rss_gb, peak_rss_since_reset_gb, reset_peak_rss
    from compresslab.models.adapters import adapter_for
    from compresslab.models.loaders import TinyModel
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ

    h = spec["hidden"]
    loader = TinyModel(spec["family"], hidden_size=h, intermediate_size=3 * h, num_layers=spec["layers"],
                       num_heads=8, num_kv_heads=2, dtype="float32", device="cpu")
    ids = torch.randint(0, 256, (spec["samples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0))
    times, peak = [], 0.0
    for _ in range(spec["repeats"]):
        model, _ = loader.load()
        adapter = adapter_for(model)
        params = sum(lin.weight.numel() for _, lin in adapter.named_linears(model))
        base = current_rss_gb()
        reset_peak_rss()
        t0 = time.perf_counter()
        SequentialEngine("cpu", max_memory=None, progress=False).run(
            model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=64)])
        times.append(time.perf_counter() - t0)
        p = peak_rss_since_reset_gb()
        peak = max(peak, (p - base) if p is not None else 0.0)
    return {"adapter": "traced" if adapter.discovered else "hand-written", "block_linear_params": params,
            "compress_s": round(min(times), 3), "s_per_mparam": round(min(times) / params * 1e6, 3),
            "peak_above_start_mb": round(peak * 1024, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    args = parse_or_run_child(ap, child)
    rows = []
    for family in args.families:
        spec = {"family": family, "hidden": args.hidden, "layers": args.layers, "samples": args.samples,
                "seqlen": args.seqlen, "repeats": args.repeats}
        rows.append(run_child(__file__, spec, family))
        print(json.dumps(rows[-1]), flush=True)
    ref = next((r for r in rows if r["method"] == "llama" and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r["status"] == "ok":
            r["time_per_param_vs_llama"] = round(r["s_per_mparam"] / ref["s_per_mparam"], 3)
    emit("families", rows, {
        "model": f"random-init, hidden {args.hidden}, intermediate {3 * args.hidden}, 8 heads (2 KV), "
                 f"{args.layers} layers, fp32, CPU (torch threads: default)",
        "method": "sparsegpt 2:4 + gptq W4 g64 (joint pass)",
        "calibration": f"random tokens, {args.samples}x{args.seqlen}",
        "compress_s": f"best of {args.repeats}",
    })


if __name__ == "__main__":
    main()
