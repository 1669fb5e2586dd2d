"""How far two checkouts' OBS sweeps agree on identical inputs, against what float order alone does.

    python experiments/bench/sweep_agreement.py --baseline /tmp/cl-before [--out DIR]

For GPTQ W4 g64 and SparseGPT 2:4 + GPTQ W4 g64 (one joint pass) on one Linear (1536×576, the shape
of SmolLM2's gate_proj; inputs with correlated channels and a few large ones, like LLM activations),
each checkout runs `obs_compress` in its own process on the same W and H. Reported, between the two
checkouts and, as the yardstick, between each checkout on H and on H perturbed at float rounding level
(H·(1 + 2⁻²³·u), u uniform in [−1, 1], symmetrized: what another float summation order does): the
weights whose mask differs, the weights that landed on another grid level (|Δ| > 1e-3; the grid steps
are 6e-3 to 1e-2 here), and the largest difference of the others (fp16 scales that rounded apart).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import ROOT, emit

CASES = ("gptq W4 g64", "sparsegpt 2:4 + gptq W4 g64")


def inputs(d=576, out=1536, n=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.ones(d)
    scale[: d // 16] = 8.0
    X = (torch.randn(n, d, generator=g) @ mix) * scale
    W = torch.randn(out, d, generator=g) * 0.02
    return W, 2.0 / n * X.T @ X


def child(case: str, eps: float, path: str):
    from compresslab.obs import GridSpec, PruneSpec, obs_compress

    W, H = inputs()
    if eps:
        u = torch.rand(H.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        H = H * (1 + eps * (u + u.T) / 2)
    prune = PruneSpec(0.5, (2, 4)) if case == CASES[1] else None
    W_hat, _, keep = obs_compress(W, H, quant=GridSpec(4, 64), prune=prune)
    torch.save({"W": W_hat, "keep": keep}, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="a checkout of the code to compare with (its src/ is used)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.child[2])
        return
    if not args.baseline:
        ap.error("--baseline DIR (a checkout to compare with) is required")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            res = {}
            for key, src, eps in (("new", ROOT / "src", 0.0), ("before", Path(args.baseline) / "src", 0.0),
                                  ("before, H at rounding level", Path(args.baseline) / "src", 2.0**-23),
                                  ("new, H at rounding level", ROOT / "src", 2.0**-23)):
                path = str(Path(tmp) / f"{len(rows)}-{key}.pt")
                subprocess.run([sys.executable, __file__, "--child", case, str(eps), path], check=True,
                               env={**os.environ, "PYTHONPATH": str(src)})
                res[key] = torch.load(path)
            for a, b in (("new", "before"), ("before, H at rounding level", "before"),
                         ("new, H at rounding level", "new")):
                x, y = res[a], res[b]
                diff = (x["W"] - y["W"]).abs()
                level = diff > 1e-3
                rows.append({"method": case, "compared": f"{a} vs {b}", "weights": diff.numel(),
                             "mask_differs": int((x["keep"] != y["keep"]).sum()),
                             "other_level": int(level.sum()), "rows_with_other_level": int(level.any(1).sum()),
                             "max_other_diff": float(diff[~level].max())})
                print(json.dumps(rows[-1]), flush=True)
    emit("sweep_agreement", rows, {
        "layer": "one Linear 1536x576, random W (std 0.02), H from 8192 correlated inputs; float32, CPU",
        "baseline": f"{args.baseline} (commit " + subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True).stdout.strip() + ")",
        "yardstick": "each version on H vs on H*(1+2^-23*u): what another float summation order alone changes",
        "other_level": "weights on another grid level (|diff| > 1e-3; steps are 6e-3 to 1e-2 here); "
                       "max_other_diff: the largest difference of the rest (fp16 scales rounded apart)",
    })


if __name__ == "__main__":
    main()
