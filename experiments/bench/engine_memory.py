"""Peak RSS of the engine on tiny random Llamas of equal width and 8 vs 32 layers.

    python experiments/bench/engine_memory.py [--hidden 512 --nsamples 64 --seqlen 512]

Each configuration runs in a fresh subprocess. Two stage sets:
- magnitude 2:4 + RTN W4: weight-only, so the engine runs no calibration forward at all;
- the same plus a Hessian-observing stage, which forces the calibration path (capture, one
  forward per block, H = 2/N XᵀX per group) as GPTQ/SparseGPT will.
"engine working set" = peak RSS − RSS after the model is built; it must not grow with depth.
"""

import argparse
import json
import subprocess
import sys

from _common import emit

CHILD = r"""
import json, resource, sys, torch
from compresslab.engine import SequentialEngine
from compresslab.models.loaders import TinyModel
from compresslab.pruner.magnitude import Magnitude
from compresslab.quantizer.rtn import RTN
a = json.loads(sys.argv[1])

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def current_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30

class ObserveHessian:
    needs = frozenset({"hessian"})
    def check(self, name, layer): pass
    def compress(self, name, layer, stats): stats.hessian

model, _ = TinyModel(num_layers=a["layers"], hidden_size=a["hidden"], intermediate_size=3 * a["hidden"],
                     num_heads=8, num_kv_heads=8, device="cpu").load()
params = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, 256, (a["nsamples"], a["seqlen"]))
base = current_gb()
stages = [Magnitude(0.5, "2:4"), RTN(bits=4, group_size=64)] + ([ObserveHessian()] if a["calib"] else [])
SequentialEngine("cpu", progress=False).run(model, ids if a["calib"] else None, stages)
print(json.dumps({"params_M": params / 1e6, "model_gb": params * 4 / 2**30, "rss_after_load_gb": base,
                  "peak_rss_gb": rss_gb(), "engine_working_set_gb": rss_gb() - base}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    rows = []
    for calib in (False, True):
        for layers in (8, 32):
            spec = {"layers": layers, "hidden": args.hidden, "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "calib": calib}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                                 check=True)
            rows.append({"stages": "magnitude 2:4 + RTN W4" + (" + Hessian observer" if calib else ""),
                         "layers": layers, **json.loads(out.stdout.strip().splitlines()[-1])})
    ratio = {r["stages"]: None for r in rows}
    for s in ratio:
        a, b = [r for r in rows if r["stages"] == s]
        ratio[s] = round(b["engine_working_set_gb"] / max(a["engine_working_set_gb"], 1e-9), 3)
    activations_gb = args.nsamples * args.seqlen * args.hidden * 4 / 2**30
    emit("engine_memory", rows, {"hidden": args.hidden, "calibration": f"{args.nsamples}x{args.seqlen}",
                                  "one_activation_copy_gb": round(activations_gb, 4),
                                  "working_set_ratio_32_over_8": ratio})


if __name__ == "__main__":
    main()
