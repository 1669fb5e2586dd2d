"""What the host allocator's policy does to a CPU block forward over the whole calibration batch.

    python experiments/bench/host_alloc.py [--nsamples 128 --seqlen 512 --reps 3]

One SmolLM2-shaped block (hidden 576, MLP 1536, GQA 9/3, random init), the engine's no-grad forward (the
adapter's lean MLP) over N x T tokens at once, in a fresh process per variant, variants one after the
other: glibc's default allocator (every tensor above 32 MiB mapped afresh and unmapped on free) without
and with PyTorch's huge pages (THP_MEM_ALLOC_ENABLE, which run.py sets), and inside
hostmem.reuse_freed_memory (freed blocks kept in the heap; what the engine does when the plan says so).
Per variant: each forward's seconds and minor page faults, and the process's peak RSS.
Writes experiments/results/host_alloc.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import ROOT, emit

CHILD = r"""
import contextlib, json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from compresslab.hostmem import reuse_freed_memory
from compresslab.models.adapters import adapter_for

a = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).eval()
block, adapter = model.model.layers[0], adapter_for(model)
x = torch.randn(a["n"], a["t"], 576)
pos = torch.arange(a["t"])[None]
rope = model.model.rotary_emb(x[:1], pos)
out = []
with (reuse_freed_memory() if a["reuse"] else contextlib.nullcontext()), torch.no_grad(), adapter.lean(block):
    for _ in range(a["reps"]):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        y = block(x, position_embeddings=rope, attention_mask=None, position_ids=pos)
        del y
        out.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
print(json.dumps({"s": [round(s, 3) for s, _ in out], "faults": [f for _, f in out],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

VARIANTS = {  # name: (THP_MEM_ALLOC_ENABLE, reuse_freed_memory)
    "glibc default": ("0", False),
    "glibc default + huge pages (run.py before the reuse)": ("1", False),
    "reuse_freed_memory": ("0", True),
    "reuse_freed_memory + huge pages (run.py now)": ("1", True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name, (thp, reuse) in VARIANTS.items():
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp, "PYTHONPATH": str(ROOT / "src")}
        spec = {"n": args.nsamples, "t": args.seqlen, "reps": args.reps, "reuse": reuse}
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        got = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"method": name, "forward_s": " / ".join(f"{s:.2f}" for s in got["s"]),
                     "best_s": min(got["s"]), "faults per forward": " / ".join(str(f) for f in got["faults"]),
                     "peak_rss_gb": got["peak_rss_gb"]})
        print(json.dumps(rows[-1]), flush=True)
    best = {r["method"]: r["best_s"] for r in rows}
    for r in rows:
        r["best / glibc default"] = r["best_s"] / best["glibc default"]
    emit("host_alloc", rows, {
        "block": "one SmolLM2-shaped Llama block (576/1536, GQA 9/3), random init, fp32, SDPA, the adapter's lean MLP",
        "tokens": f"{args.nsamples}x{args.seqlen} in one forward, {args.reps} forwards per process",
        "machine": f"CPU, {os.cpu_count()} cores; each variant in a fresh process, one after the other",
        "faults": "minor page faults during each forward (ru_minflt); peak_rss_gb: the process's ru_maxrss",
    })


if __name__ == "__main__":
    main()
