"""Uniform vs allocated per-layer levels on SmolLM2 at one budget: OWL, DP and EvoPress.

    python experiments/bench/allocation.py [--nsamples 128] [--windows 16] [--generations 50] [--only CELL ...] [--allocs uniform dp ...]

Cells: Wanda and SparseGPT at 70% unstructured (uniform | owl | dp | evopress, levels 0.5..0.9), and
GPTQ g64 at 3 bits on average (uniform W3 | dp | evopress over {2, 3, 4}; the budget is the packed
avg_bits of uniform W3, scales included), and SLiM-LoRA adapters on sparsegpt 2:4 + gptq W4 at the
stored parameters of rank_ratio 0.1 (uniform | dp | evopress over ranks {16, 32, 57, 96, 128}; the issue asks
uniform vs dp, `--allocs uniform dp`). Each run is a `run.py` process; `time/allocation_s` is the
search, `compress_s` the compression after it. Runs whose folder holds an ok metrics.json are kept, and so
are the ok rows of the committed allocation.json (a later session, whose folders are gone, completes the
table; delete a row there to redo it).
Writes experiments/results/allocation.{json,md}.
"""

import json
from pathlib import Path

from _common import RESULTS, ROOT, emit, row_from_run, run_dir_for, run_table, table_args, table_overrides

SPARSE = "allocation.levels=[0.5,0.6,0.7,0.8,0.9]"
BITS = ["allocation.budget=avg_bits", "allocation.levels=[2,3,4]"]
CELLS = {
    "wanda 70%": ["pruner=wanda", "pruner.sparsity=0.7"],
    "sparsegpt 70%": ["pruner=sparsegpt", "pruner.sparsity=0.7"],
    "gptq 3 bits g64": ["quantizer=gptq", "quantizer.bits=3", "quantizer.group_size=64"],
    "slim adapters (sparsegpt 2:4 + gptq W4)": ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq",
                                                "quantizer.group_size=64", "lowrank=slim", "lowrank.rank_ratio=0.1"],
}
RANKS = ["allocation.budget=params", "allocation.levels=[16,32,57,96,128]"]


def allocations(cell: str, generations: int) -> dict[str, list[str]]:
    extra = BITS if "bits" in cell else RANKS if "adapters" in cell else [SPARSE]
    out = {"uniform": ["allocation=null"]}
    if "%" in cell:
        out["owl"] = ["allocation=owl"]
    out["dp"] = ["allocation=dp", *extra]
    out["evopress"] = ["allocation=evopress", *extra, f"allocation.generations={generations}"]
    return out


def main():
    ap = table_args("allocation")
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--allocs", nargs="*", help="allocations to run in each cell (default: all), e.g. uniform dp")
    args = ap.parse_args()
    if args.out == ap.get_default("out"):
        args.out = str(ROOT / "outputs" / "bench_allocation")
    out = Path(args.out)
    common = ["eval=ppl", *table_overrides(args)]
    cells = [c for c in CELLS if not args.only or c in args.only]
    committed = RESULTS / "allocation.json"
    old = json.loads(committed.read_text()) if committed.is_file() else {"rows": [], "meta": {}}
    kept = {r["method"]: r for r in old["rows"] if r.get("status") == "ok"}
    notes = {k: v for k, v in old["meta"].items() if k.startswith("note")}  # written by hand: kept
    if not args.collect:
        for cell in cells:
            for alloc, extra in allocations(cell, args.generations).items():
                if args.allocs and alloc not in args.allocs:
                    continue
                name = f"{cell} | {alloc}"
                done = run_dir_for(out, name) / "metrics.json"
                if done.is_file() and json.loads(done.read_text()).get("status") == "ok" or name in kept:
                    continue
                run_table("allocation", {name: [*CELLS[cell], *extra]}, common, out)
    rows = []
    for cell in CELLS:
        for alloc in allocations(cell, args.generations):
            d = run_dir_for(out, f"{cell} | {alloc}")
            if not (d / "metrics.json").is_file():
                if f"{cell} | {alloc}" in kept:
                    rows.append(kept[f"{cell} | {alloc}"])
                continue
            r = row_from_run(f"{cell} | {alloc}", d)
            m = json.loads((d / "metrics.json").read_text()).get("metrics", {})
            r.update({"search_s": m.get("time/allocation_s"), "met": m.get("allocation/met"),
                      "kl_start": m.get("allocation/kl_start"), "kl": m.get("allocation/kl")})
            rows.append(r)
    emit("allocation", rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "search": f"owl M=5 lam=0.08; dp: relative Hessian output error per layer and level, exact DP; evopress: "
                  f"from dp's choice, {args.generations} generations x 8 offspring, KL on 4 calibration windows",
        "columns": "search_s: the allocation's time (measuring pass + search); compress_s: the compression after it; "
                   "met: mean sparsity or packed avg_bits the allocation met",
        **notes,
    })


if __name__ == "__main__":
    main()
