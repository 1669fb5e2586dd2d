"""Peak RSS of the engine: depth (tiny random Llamas) and the memory plan (SmolLM2).

    python experiments/bench/engine_memory.py [--hidden 512 --nsamples 64 --seqlen 512]
    python experiments/bench/engine_memory.py --smollm2 [--budget 1GB]

--smollm2 (issue 15's target): sparsegpt 2:4 + gptq W4 g64 at 128x512 on SmolLM2, run.py as a user runs
it, once with no budget (one pass) and once with engine.max_memory=<budget>, one after the other in
this invocation. Reports the compression's peak RSS (VmHWM, reset after loading) above the RSS right
after loading, the plan's estimate, the compression time and its ratio to the unconstrained run, and
the perplexity. Writes experiments/results/engine_memory_smollm2.{json,md}.

Without --smollm2:
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


def smollm2(args):
    from pathlib import Path

    from _common import ROOT, run_table

    base = ["model=smollm2_135m", "pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4",
            "quantizer.group_size=64"]
    common = ["data.nsamples=128", "data.seqlen=512", "eval.seqlen=2048", "eval.max_windows=16", "logger=none",
              "engine.progress=false", "eval.progress=false"]
    methods = {"no budget (one pass)": [*base, "engine.max_memory=null"],
               f"engine.max_memory={args.budget}": [*base, f"engine.max_memory={args.budget}"]}
    rows = run_table("engine_memory_smollm2", methods, common, Path(args.out), collect=args.collect)
    ref = rows[0]
    for r in rows:
        m = json.loads((Path(args.out) / _dir(r["method"]) / "metrics.json").read_text())["metrics"]
        r["rss_after_load_gb"] = m.get("memory/rss_after_load_gb")
        r["above_load_gb"] = (r["compress_peak_rss_gb"] - r["rss_after_load_gb"]
                              if r.get("compress_peak_rss_gb") and r["rss_after_load_gb"] else None)
        r["plan_gb (10^9 B)"] = m.get("memory/plan_gb")
        r["chunk_size (0 = one pass)"] = m.get("engine/chunk_size")
        if ref.get("compress_s") and r.get("compress_s"):
            r["time_ratio"] = r["compress_s"] / ref["compress_s"]
    emit("engine_memory_smollm2", rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "pipeline": "sparsegpt 2:4 + gptq W4 g64 (one joint pass), calibration wikitext2 128x512",
        "eval": "wikitext2 test, seqlen 2048, first 16 windows",
        "memory": "compress_peak_rss_gb = VmHWM over the compression (reset after loading), GiB; above_load_gb = "
                  "that minus the RSS right after loading; plan_gb = the engine's estimate (10^9 bytes)",
        "target": f"with engine.max_memory={args.budget}: above_load_gb <= 1, time_ratio <= 1.2, the same ppl",
    })


def _dir(method):
    from _common import run_dir_for
    from pathlib import Path

    return run_dir_for(Path("."), method).name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--smollm2", action="store_true", help="the memory plan on SmolLM2 (see the module doc)")
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--out", default=None)
    ap.add_argument("--collect", action="store_true",
                    help="--smollm2: run nothing, tabulate the runs in --out (e.g. the two rows run side by side)")
    args = ap.parse_args()
    if args.smollm2:
        from _common import ROOT

        args.out = args.out or str(ROOT / "outputs" / "bench_engine_memory_smollm2")
        return smollm2(args)
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
