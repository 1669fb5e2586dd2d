"""SparseGPT 2:4 + GPTQ on one Linear: the joint pass against two passes and against SparseGPT then RTN.

    python experiments/bench/joint_rule.py [--baseline DIR]

Correlated synthetic inputs (tests/conftest.py's `correlated_inputs`: X = Z·A with a random mixing
A, so H = XᵀX is far from diagonal), a random W (2d, d), 3 seeds per case. The figure of merit is
the layer's relative output error ‖(W − Ŵ)X‖ / ‖WX‖. Rows: the joint pass (`pruner.joint=true`),
two passes (`pruner.joint=false`: SparseGPT, then GPTQ holding its mask), SparseGPT then RTN, and
SparseGPT alone (the pruning error every row includes). `--baseline DIR` also runs the joint pass of
another checkout (its src/), e.g. the commit before the N:M mask rule changed. Writes
experiments/results/joint_rule.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import ROOT, emit

CASES = [(64, 128, 3, 32), (64, 512, 3, 32), (128, 512, 3, 32), (128, 512, 4, 32), (128, 512, 8, 32),
         (256, 2048, 3, 64), (128, 512, 4, -1)]


def child(which: str) -> dict:
    import copy

    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from tests.conftest import correlated_inputs

    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.quantizer.rtn import RTN
    from compresslab.stages import fuse_stages
    from compresslab.stats import LayerStats

    torch.set_num_threads(1)
    rows = {}
    for d, n, bits, gs in CASES:
        variants = {
            "joint": lambda: fuse_stages([SparseGPT(0.5, "2:4"), GPTQ(bits=bits, group_size=gs)]),
            "two passes": lambda: [SparseGPT(0.5, "2:4"), GPTQ(bits=bits, group_size=gs)],
            "sparsegpt then rtn": lambda: [SparseGPT(0.5, "2:4"), RTN(bits=bits, group_size=gs)],
            "sparsegpt alone": lambda: [SparseGPT(0.5, "2:4")],
        }
        if which == "baseline":
            variants = {"joint": variants["joint"]}
        for name, make in variants.items():
            errs = []
            for seed in range(3):
                torch.manual_seed(seed)
                X = correlated_inputs(n, d, seed=seed)
                lin0 = nn.Linear(d, 2 * d, bias=False)
                lin = copy.deepcopy(lin0)
                for stage in make():
                    stats = LayerStats(stage.needs | {"hessian"}, d)
                    stats.add_batch(X)
                    stage.compress("l", lin, stats)
                W, Wh = lin0.weight.data, lin.weight.data
                errs.append(float(((W - Wh) @ X.T).norm() / (W @ X.T).norm()))
            rows[f"{d}x{n} W{bits} g{gs}|{name}"] = round(sum(errs) / len(errs), 4)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="another checkout: its joint pass is run too (its src/)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs = {"new": ROOT / "src"}
    if args.baseline:
        runs["baseline"] = f"{args.baseline}/src"
    results = {}
    for which, src in runs.items():
        env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, __file__, "--child", which], capture_output=True, text=True,
                             env=env, cwd=ROOT / "experiments" / "bench", check=True)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for d, n, bits, gs in CASES:
        case = f"{d}x{n} W{bits} g{gs}"
        row = {"method": case}
        if "baseline" in results:
            row["joint (baseline)"] = results["baseline"][f"{case}|joint"]
        for name in ("joint", "two passes", "sparsegpt then rtn", "sparsegpt alone"):
            row[name] = results["new"][f"{case}|{name}"]
        rows.append(row)
    emit("joint_rule", rows, {
        "inputs": "correlated synthetic X (n x d), random W (2d x d), mean of 3 seeds; relative output error",
        "baseline": args.baseline,
    })


if __name__ == "__main__":
    main()
