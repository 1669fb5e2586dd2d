"""What the chunked path (engine.chunk_size=k, the memory plan's fallback) costs against one pass.

    python experiments/bench/chunked_speed.py [--blocks 4 --nsamples 128 --seqlen 512 --chunk 64 --repeats 2]

SmolLM2-shaped random blocks (hidden 576, MLP 1536, GQA 9/3), sparsegpt 2:4 + gptq W4 g64 on random-token
calibration, the engine run three ways, each in a fresh 1-thread process, interleaved `--repeats` times
(A B C A B C ...) so that whatever else the machine runs falls on all three alike:
- one pass (chunk_size=null);
- chunked, every Linear once per sample: h = x + o_proj(a) from o_proj's kept input, and the outputs
  h + down_proj(p) from down_proj's kept input (what the plan picks when p fits the budget);
- chunked, o_proj's input kept, down_proj's not (adapter data residual_mlp_out=None): gate/up run again
  for the outputs (what the plan picks when p does not fit);
- with --all, the earlier paths: the attention run again to reach h (residual_attn=None as well), and the
  block run whole for every group (residual_mlp=None as well).
Reports the compression seconds (median over repeats), the ratio to one pass, the peak RSS above the
model (VmHWM), and the outputs' relative error against the dense blocks' outputs (one uncompressed run)
beside their difference from one pass's. Writes experiments/results/chunked_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import emit

CHILD = r"""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from compresslab.engine import SequentialEngine
from compresslab.metrics import peak_rss_since_reset_gb, reset_peak_rss, current_rss_gb
from compresslab.models import adapters
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
if a["path"] in ("attn", "branch", "whole"):
    object.__setattr__(adapters._LLAMA, "residual_mlp_out", None)
if a["path"] in ("branch", "whole"):
    object.__setattr__(adapters._LLAMA, "residual_attn", None)
if a["path"] == "whole":
    object.__setattr__(adapters._LLAMA, "residual_mlp", None)
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  num_hidden_layers=a["blocks"], vocab_size=49152, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 49152, (a["nsamples"], a["seqlen"]), generator=torch.Generator().manual_seed(1))
base = current_rss_gb()
reset_peak_rss()
eng = SequentialEngine("cpu", chunk_size=a["chunk"], max_memory=None, progress=False)
t0 = time.perf_counter()
stages = [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=64)] if a["compress"] else []
res = eng.run(model, ids, stages, keep_outputs=True)
dt = time.perf_counter() - t0
torch.save(res["outputs"], a["out"])
print(json.dumps({"compress_s": dt, "peak_above_model_gib": peak_rss_since_reset_gb() - base}))
"""

VARIANTS = {
    "one pass": {"chunk": None, "path": "all"},
    "chunked, every Linear once (o_proj's and down_proj's inputs kept)": {"chunk": "CHUNK", "path": "all"},
    "chunked, o_proj's input kept (gate/up twice)": {"chunk": "CHUNK", "path": "attn"},
    "chunked, attention again to reach h (gate/up twice)": {"chunk": "CHUNK", "path": "branch"},
    "chunked, block run whole per group": {"chunk": "CHUNK", "path": "whole"},
}
EARLIER = ("chunked, attention again to reach h (gate/up twice)", "chunked, block run whole per group")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="also the earlier chunked paths")
    args = ap.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if args.all or k not in EARLIER}
    import tempfile

    import torch

    tmp = tempfile.mkdtemp()
    runs = {name: [] for name in variants}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for r in range(args.repeats):
        for name, v in variants.items():
            a = {"blocks": args.blocks, "nsamples": args.nsamples, "seqlen": args.seqlen, "path": v["path"], "compress": True,
                 "chunk": args.chunk if v["chunk"] == "CHUNK" else None, "out": f"{tmp}/{r}_{list(variants).index(name)}.pt"}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            runs[name].append({**json.loads(proc.stdout.strip().splitlines()[-1]), "out": a["out"]})
            print(name, runs[name][-1], flush=True)
    a = {"blocks": args.blocks, "nsamples": args.nsamples, "seqlen": args.seqlen, "path": "all", "compress": False,
         "chunk": None, "out": f"{tmp}/dense.pt"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    dense = torch.load(a["out"])
    ref = torch.load(runs["one pass"][0]["out"])
    base = statistics.median(x["compress_s"] for x in runs["one pass"])
    rows = []
    for name, rs in runs.items():
        s = statistics.median(x["compress_s"] for x in rs)
        out = torch.load(rs[0]["out"])
        rows.append({"variant": name, "compress_s": round(s, 1), "ratio_to_one_pass": round(s / base, 3),
                     "all_s": [round(x["compress_s"], 1) for x in rs],
                     "peak_above_model_gib": round(max(x["peak_above_model_gib"] for x in rs), 3),
                     "outputs_rel_err_vs_dense": float((out - dense).norm() / dense.norm()),
                     "outputs_rel_diff_vs_one_pass": float((out - ref).norm() / ref.norm())})
    emit("chunked_speed", rows, {
        "model": f"random-init SmolLM2-shaped Llama, {args.blocks} blocks (hidden 576, MLP 1536, GQA 9/3), fp32",
        "stages": "sparsegpt 2:4 + gptq W4 g64", "calibration": f"random tokens, {args.nsamples}x{args.seqlen}",
        "chunk_size": args.chunk, "threads": "1 per process, variants interleaved", "repeats": args.repeats,
        "note": "random weights make the compressed solution ill-posed: the chunked paths sum each Hessian over "
                "chunks (float order), which flips near-tied 2:4 and grid choices, and later groups move with "
                "them (outputs_rel_diff_vs_one_pass); the error against the dense outputs is the figure of merit",
    })


if __name__ == "__main__":
    main()
