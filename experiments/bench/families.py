"""The engine on every supported family at equal width: time and memory per parameter against Llama.

    python experiments/bench/families.py [--hidden 256 --layers 4 --samples 16 --seqlen 256 --repeats 3]

Each family (tests/models/test_discover.py's list) runs in its own process: a random-init model from
`TinyModel(family)` (hidden 256, 8 heads, 2 KV heads where the family has them, intermediate 3x),
sparsegpt 2:4 + gptq W4 g64 (one joint pass) on random-token calibration, fp32, CPU. Reported: the
best of `--repeats` compression times, seconds per million block-Linear parameters and its ratio to
Llama's (the issue's bar: no family above 1.5x), peak RSS above the RSS before the engine, and how
the adapter was found (hand-written or traced). Writes experiments/results/families.{json,md}.

The Mixture-of-Experts families (8 experts of intermediate 3x, top-2; Qwen2-MoE and DeepSeek-V3 with a
shared expert, DeepSeek-V3 with MLA attention and a dense first layer) also run with
engine.moe_calibration=all, and report the routed calibration tokens per expert (min / median / max
over every expert of every block, and how many fell below moe_min_tokens = 64 and took all tokens'
statistics) and the cost of `all` against `routed` (compression time ratio, best of repeats each).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import emit, parse_or_run_child, run_child

FAMILIES = ["llama", "mistral", "qwen2", "smollm3", "qwen3", "gemma2", "gemma3_text", "phi3", "falcon", "stablelm",
            "olmo2", "granite", "opt", "gpt_neox", "gpt2"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _config(loader, family: str, h: int):
    cfg = loader.config()
    if family == "deepseek_v3":  # MLA sized for the width (its defaults are DeepSeek-V3's own), 2 routing groups
        for k, v in dict(num_key_value_heads=8, q_lora_rank=h // 2, kv_lora_rank=h // 2, qk_rope_head_dim=16,
                         qk_nope_head_dim=16, head_dim=16, v_head_dim=32, n_group=2, topk_group=1, first_k_dense_replace=1,
                         n_shared_experts=1).items():
            setattr(cfg, k, v)
    return cfg


def child(spec: dict) -> dict:
    import torch

    from compresslab.engine import SequentialEngine
    from compresslab.metrics import current_rss_gb, peak_rss_since_reset_gb, reset_peak_rss
    from compresslab.models.adapters import adapter_for
    from compresslab.models.loaders import TinyModel
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ

    from transformers import AutoModelForCausalLM

    from compresslab.metrics import compression_summary, experts_summary
    from compresslab.models import as_linears

    h, family = spec["hidden"], spec["family"]
    loader = TinyModel(family, hidden_size=h, intermediate_size=3 * h, num_layers=spec["layers"],
                       num_heads=8, num_kv_heads=2, dtype="float32", device="cpu")
    cfg = _config(loader, family, h)
    ids = torch.randint(0, 256, (spec["samples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0))
    modes = ["routed", "all"] if family in MOE else ["routed"]
    times, peak, experts = {m: [] for m in modes}, 0.0, []
    for mode in modes:
        for _ in range(spec["repeats"]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            as_linears(model)
            adapter = adapter_for(model)
            params = sum(lin.weight.numel() for _, lin in adapter.named_linears(model))
            base = current_rss_gb()
            reset_peak_rss()
            t0 = time.perf_counter()
            SequentialEngine("cpu", max_memory=None, progress=False, moe_calibration=mode).run(
                model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=64)])
            times[mode].append(time.perf_counter() - t0)
            p = peak_rss_since_reset_gb()
            if mode == "routed":
                peak = max(peak, (p - base) if p is not None else 0.0)
                experts = experts_summary(compression_summary(model)[1])[1]
    best = min(times["routed"])
    row = {"adapter": "traced" if adapter.discovered else "hand-written", "block_linear_params": params,
           "compress_s": round(best, 3), "s_per_mparam": round(best / params * 1e6, 3),
           "peak_above_start_mb": round(peak * 1024, 1)}
    if experts:
        tokens = sorted(e["tokens"] for e in experts)
        row.update({"experts": len(tokens), "tokens_min": tokens[0], "tokens_median": tokens[len(tokens) // 2],
                    "tokens_max": tokens[-1], "starved": sum(e["stats_from"] != "routed" for e in experts),
                    "all_compress_s": round(min(times["all"]), 3),
                    "all_vs_routed": round(min(times["all"]) / best, 3)})
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=FAMILIES + MOE)
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
        "MoE": "8 experts (intermediate 3x), top-2; tokens_*: routed calibration tokens per expert over every MoE "
               "block; starved: experts under moe_min_tokens=64 (statistics from all tokens); all_vs_routed: "
               "compression time with engine.moe_calibration=all over routed",
        "compress_s": f"best of {args.repeats}",
    })


if __name__ == "__main__":
    main()
