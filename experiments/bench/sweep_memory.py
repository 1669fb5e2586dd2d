"""Peak memory of one Linear group's compression (the engine's `_compress_group`: statistics, the OBS
sweep, the dense originals, the codes) at real layer shapes, for two checkouts of src/ side by side.

    python experiments/bench/sweep_memory.py --baseline /tmp/wt-old [--only 'llama2-7b down']

Each (code, shape, method) runs in a fresh process: the group's Linears and its Hessian (from random
inputs, enough tokens for a positive-definite H) are built first, then VmHWM is reset
(/proc/self/clear_refs) and the group compressed; `above_gb` is the peak RSS over that call minus the
RSS just before it (GiB), i.e. what the compression itself adds beside the model and the statistics it
was handed. Writes experiments/results/sweep_memory.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import ROOT, emit

# (rows of each Linear, how many share the input, d_in)
SHAPES = {
    "smollm2 gate/up": ([1536, 1536], 576),
    "smollm2 down": ([576], 1536),
    "llama2-7b gate/up": ([11008, 11008], 4096),
    "llama2-7b down": ([4096], 11008),
}
METHODS = ("gptq W4 g64", "sparsegpt 2:4 + gptq W4 g64")

CHILD = r"""
import json, sys, torch
from torch import nn
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(int(spec["threads"]))
from compresslab.engine import SequentialEngine
from compresslab.quantizer.gptq import GPTQ
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.stages import fuse_stages
from compresslab.stats import LayerStats

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 2**20
d = spec["d"]
group = [(f"l{i}", nn.Linear(d, r, bias=False)) for i, r in enumerate(spec["rows"])]
stats = LayerStats({"hessian"}, d)
n = max(2 * d, 4096)
for _ in range(0, n, 2048):  # inputs in slices: only the statistics stay
    stats.add_batch(torch.randn(1, 2048, d))
stats.hessian  # built before the measurement, as the engine hands it over
stages = [GPTQ(bits=4, group_size=64)]
if spec["method"].startswith("sparsegpt"):
    stages = fuse_stages([SparseGPT(sparsity=0.5, pattern="2:4"), *stages])
engine = SequentialEngine(device="cpu", progress=False, distributed="off")
from types import SimpleNamespace
adapter = SimpleNamespace(blocks="model.layers")  # all _compress_group reads of it: the names' prefix
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
engine._compress_group(adapter, 0, group, stages, stats)
peak = status("VmHWM:")
print(json.dumps({"above_gb": peak - before, "rss_before_gb": before}))
"""


def run(src: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a checkout (e.g. a git worktree) of the code to compare with")
    ap.add_argument("--only", nargs="*", help="shape names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    codes = {"before": Path(args.baseline) / "src", "new": ROOT / "src"}
    sha = {k: subprocess.run(["git", "-C", str(v.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() for k, v in codes.items()}
    rows = []
    for shape, (outs, d) in SHAPES.items():
        if args.only and shape not in args.only:
            continue
        for method in METHODS:
            got = {}
            for version, src in codes.items():
                got[version] = run(src, {"rows": outs, "d": d, "method": method, "threads": args.threads})
                print(shape, method, version, got[version], flush=True)
            h_gb = d * d * 4 / 2**30
            w_gb = sum(outs) * d * 4 / 2**30
            rows.append({"shape": shape, "method": method, "rows x d_in": f"{sum(outs)} x {d}",
                         "H_gb": h_gb, "W_gb": w_gb,
                         "above_gb before": got["before"]["above_gb"], "above_gb new": got["new"]["above_gb"],
                         "new / before": got["new"]["above_gb"] / got["before"]["above_gb"],
                         "new in H + W units": f"{got['new']['above_gb'] / max(h_gb, 1e-9):.2f} H"
                         if h_gb >= w_gb else f"{got['new']['above_gb'] / w_gb:.2f} W"})
    emit("sweep_memory", rows, {
        "what": "peak RSS added by the engine's _compress_group for one Linear group (GiB), beside the group's "
                "Linears and its Hessian; fp32, CPU, a fresh process per cell",
        "codes": f"before = {sha['before']} ({codes['before']}), new = {sha['new']}",
        "H_gb, W_gb": "one (d_in, d_in) fp32 matrix; the group's stacked weight, fp32",
        "threads": args.threads,
    }, merge=bool(args.only))


if __name__ == "__main__":
    main()
