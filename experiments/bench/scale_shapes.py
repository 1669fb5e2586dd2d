"""The engine at real layer shapes on the CPU: random-init blocks at Llama-2-7B and Llama-3-8B shapes.

    python experiments/bench/scale_shapes.py [--samples 16 --seqlen 2048] [--shapes llama2_7b llama3_8b]
                                             [--methods "gptq W4 g128" "sparsegpt 2:4 + gptq W4 g128"]

Each (shape, method) runs in its own process: 2 random-init blocks, random-token calibration of
`--samples` x `--seqlen`, the engine as run.py runs it (one pass). Per block: seconds, split into
forward / statistics / factorization / sweep / other (compress_speed.py's timers); peak RSS above the
RSS before the engine (VmHWM reset); achieved GFLOP/s of the forward and of the Hessian against a dense
fp32 2048² matmul measured in the same process. The cost model per block (so a reader can check it):

    forward        N T (2 P + 4 T C)          P = weights of the block's Linears; attention QKᵀ and PV
    Hessian        Σ_groups 2 N T d²          (the symmetric accumulation does ~(k+1)/2k of it)
    factorization  Σ_groups d³                (Cholesky of H and the inverse's upper factor)
    sweep          Σ_groups rows · d²         (OBS: each column's rank-1 update of the remaining columns)
    error          Σ_linears 4 rows · d²      (‖ΔX‖² and ‖WX‖² through H: ΔH and WH, per Linear)

Extrapolation to the whole model at 128 x 2048 calibration: forward, statistics and other scale
with the tokens, factorization, sweep and error do not; times the model's layer count. Writes
experiments/results/scale_shapes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _common import emit, parse_or_run_child, run_child

SHAPES = {  # hidden, intermediate, heads, kv heads, layers of the full model
    "llama2_7b": (4096, 11008, 32, 32, 32),
    "llama3_8b": (4096, 14336, 32, 8, 32),
    "tiny": (256, 768, 8, 2, 4),  # a smoke run
}
METHODS = ("gptq W4 g128", "sparsegpt 2:4 + gptq W4 g128")


def cost_model(model, n, t):
    """FLOPs per block: forward, Hessian (full product), factorization, sweep (see the module doc)."""
    from compresslab.models.adapters import adapter_for

    adapter = adapter_for(model)
    c = model.config.hidden_size
    block = adapter.block_list(model)[0]
    groups = adapter.linear_groups(block)
    p = sum(lin.weight.numel() for g in groups for _, lin in g)
    fwd = n * t * (2 * p + 4 * t * c)
    hess = sum(2 * n * t * g[0][1].in_features ** 2 for g in groups)
    fact = sum(g[0][1].in_features ** 3 for g in groups)
    sweep = sum(sum(lin.out_features for _, lin in g) * g[0][1].in_features ** 2 for g in groups)
    error = sum(4 * lin.out_features * lin.in_features ** 2 for g in groups for _, lin in g)
    return {"forward": fwd, "hessian": hess, "factorization": fact, "sweep": sweep, "error": error}


def child(spec: dict) -> dict:
    from compress_speed import instrument, matmul_gflops, stages
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresslab.engine import SequentialEngine
    from compresslab.metrics import current_rss_gb, peak_rss_since_reset_gb, reset_peak_rss

    torch.manual_seed(0)
    c, inter, heads, kv, _ = SHAPES[spec["shape"]]
    cfg = LlamaConfig(hidden_size=c, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=2, vocab_size=1024, max_position_embeddings=max(4096, spec["seqlen"]))
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1024, (spec["samples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0))
    cost = cost_model(model, *ids.shape)
    timers = instrument()
    rate0 = matmul_gflops()
    base = current_rss_gb()
    reset_peak_rss()
    t0 = time.perf_counter()
    SequentialEngine("cpu", max_memory=None, progress=False).run(model, ids, stages(spec["method"], group_size=128))
    total = time.perf_counter() - t0
    peak = peak_rss_since_reset_gb()
    rate = (rate0 + matmul_gflops()) / 2
    blocks = 2
    forward = timers["forward_with_hooks"] - timers["compress_group"] - timers["statistics"]
    sweep = timers["obs"] - timers["factorization"]
    parts = {"forward": forward, "statistics": timers["statistics"], "factorization": timers["factorization"],
             "sweep": sweep, "error": timers["error"]}
    parts["other"] = total - sum(parts.values())
    per = {k: v / blocks for k, v in parts.items()}
    return {"s_per_block": round(total / blocks, 1), **{f"{k}_s": round(v, 2) for k, v in per.items()},
            "peak_above_start_gb": round(peak - base, 2) if peak is not None else None,
            "forward_gflops": round(cost["forward"] / per["forward"] / 1e9, 1),
            "statistics_gflops (full Hessian FLOPs)": round(cost["hessian"] / per["statistics"] / 1e9, 1),
            "matmul_gflops": round(rate, 1),
            **{f"cost_{k}_gflop": round(v / 1e9, 1) for k, v in cost.items()}, "_per": per}


def extrapolate(row: dict, spec: dict, samples=128, seqlen=2048) -> float:
    """Whole-model seconds at samples x seqlen: forward and statistics scale with the tokens (the
    forward's attention term with seqlen twice: approximated by tokens only, stated in the table)."""
    per = row.pop("_per")
    scale = samples * seqlen / (spec["samples"] * spec["seqlen"])
    layers = SHAPES[spec["shape"]][4]
    return layers * ((per["forward"] + per["statistics"] + per["other"]) * scale + per["factorization"]
                     + per["sweep"] + per["error"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--shapes", nargs="+", default=["llama2_7b", "llama3_8b"], choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parse_or_run_child(ap, child)
    rows = []
    for shape in args.shapes:
        for method in args.methods:
            spec = {"shape": shape, "method": method, "samples": args.samples, "seqlen": args.seqlen}
            row = run_child(__file__, spec, f"{shape}: {method}")
            if row["status"] == "ok":
                whole = extrapolate(row, spec)
                row.update(whole_model_s_at_128x2048=round(whole), whole_model_h=round(whole / 3600, 2))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    if "tiny" in args.shapes:  # a smoke run: printed, not written to the results
        return
    emit("scale_shapes", rows, merge=True, meta={  # merge: shapes run in separate invocations share the table
        "blocks": "2 random-init blocks per shape, fp32, CPU, one pass (engine.max_memory=null)",
        "calibration": f"random tokens, {args.samples}x{args.seqlen}",
        "shapes": {k: dict(zip(("hidden", "intermediate", "heads", "kv_heads", "layers"), v)) for k, v in SHAPES.items()
                   if k != "tiny"},
        "cost model": "forward N T (2P + 4TC); Hessian sum 2 N T d^2 (full product); factorization sum d^3; "
                      "sweep sum rows d^2; error sum 4 rows d^2 per Linear (per block, in GFLOP)",
        "extrapolation": "layers x ((forward + statistics + other) x tokens ratio + factorization + sweep + error) to "
                         "128x2048; the attention term grows with seqlen too, so this is a lower bound when "
                         "seqlen grows",
    })


if __name__ == "__main__":
    main()
