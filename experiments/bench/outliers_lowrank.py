"""Issue 20's table on SmolLM2-135M: outlier-aware quantizers and Fisher-weighted / allocated low rank.

    python experiments/bench/outliers_lowrank.py [--table bits|cut|compensation|all] [--only NAME ...]
        [--nsamples 128 --calib-seqlen 512 --windows 16]

- bits: GPTQ g64 vs SpQR vs SqueezeLLM (with and without its sparse part) near 3.1-3.5 and 4.1-4.5
  packed bits per weight (avg_bits counts codes, scales/zeros or tables, and the outliers' CSR).
- cut: low rank as compression (no pruner/quantizer) at a 20% and a 40% parameter cut: naive SVD,
  ASVD, SVD-LLM, FWSVD, SVD-LLM V2 (its per-matrix ratios).
- compensation: sparsegpt 2:4 + gptq W4 g64 plus adapters at rank_ratio 0.1: slim vs fwsvd vs svd_llm.
Each row is its own `run.py` process (kept when its folder already holds an ok metrics.json: rerun to
finish a table). Writes experiments/results/outliers_lowrank_<table>.{json,md} (a reduced protocol: _<N>x<T>_w<windows>).
"""

import json
from pathlib import Path

from _common import emit, run_dir_for, run_table, table_args, table_overrides

GPTQ = ["quantizer=gptq", "quantizer.group_size=64"]
SQ = ["quantizer=squeezellm"]
DENSE_ONLY = ["quantizer.outlier_fraction=0", "quantizer.sensitive_fraction=0"]
SPQR = ["quantizer=spqr", "quantizer.group_size=32", "quantizer.outlier_threshold=3"]
BITS = {  # the order they run in (a table stopped early has the most telling rows)
    "gptq W3 g64": [*GPTQ, "quantizer.bits=3"],
    "spqr W3 g16 (paper's threshold 0.2)": ["quantizer=spqr", "quantizer.bits=3"],
    "squeezellm W3 dense-only": [*SQ, "quantizer.bits=3", *DENSE_ONLY],
    "squeezellm W3 + 0.45% sparse": [*SQ, "quantizer.bits=3"],
    # groups of 32 and threshold 3: ~0.2% outliers and ~3.4 bits (the paper's 16 / 0.2 keep ~5% here: 5.2 bits)
    "spqr W3 g32 threshold 3": [*SPQR, "quantizer.bits=3"],
    "gptq W4 g64": [*GPTQ, "quantizer.bits=4"],
    "squeezellm W4 + 0.45% sparse": [*SQ, "quantizer.bits=4"],
    "spqr W4 g32 threshold 3": [*SPQR, "quantizer.bits=4"],
    "squeezellm W4 dense-only": [*SQ, "quantizer.bits=4", *DENSE_ONLY],
}
CUT = {}
for cut, ratio in (("20%", 0.8), ("40%", 0.6)):
    args = [f"lowrank.param_ratio={ratio}", "lowrank.rank_ratio=null"]
    for m in ("naive", "asvd", "svd_llm", "fwsvd"):
        CUT[f"{m} {cut} cut"] = [f"lowrank={m}", *args]
    CUT[f"svd_llm_v2 {cut} cut"] = ["lowrank=svd_llm_v2", f"lowrank.param_ratio={ratio}"]
    CUT[f"svd_llm_v2 {cut} cut, rule=loss"] = ["lowrank=svd_llm_v2", f"lowrank.param_ratio={ratio}", "lowrank.rule=loss"]
    CUT[f"svd_llm_v2 {cut} cut, uniform ranks"] = ["lowrank=svd_llm_v2", f"lowrank.param_ratio={ratio}",
                                                  "lowrank.heterogeneous=false"]
BASE = ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4", "quantizer.group_size=64"]
COMPENSATION = {"no low-rank": BASE, **{m: [*BASE, f"lowrank={m}", "lowrank.rank_ratio=0.1"]
                                       for m in ("slim", "fwsvd", "svd_llm")}}
TABLES = {"bits": BITS, "cut": CUT, "compensation": COMPENSATION}


def main():
    ap = table_args("outliers_lowrank")
    ap.add_argument("--table", choices=[*TABLES, "all"], default="all")
    args = ap.parse_args()
    common = table_overrides(args)
    # a reduced protocol gets tables of its own: its rows are not comparable with the 128x512 / 16-window ones
    suffix = "" if (args.nsamples, args.calib_seqlen, args.windows) == (128, 512, 16) else \
        f"_{args.nsamples}x{args.calib_seqlen}_w{args.windows}"
    out = Path(args.out + suffix)
    meta = {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "times": "compress_s includes the Fisher pass (one backward per calibration window) where a method needs it",
    }
    for name, methods in TABLES.items():
        if args.table not in (name, "all"):
            continue
        todo = {m: o for m, o in methods.items() if not args.only or m in args.only}
        if not args.collect:
            for m, o in todo.items():
                done = run_dir_for(out / name, m) / "metrics.json"
                if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
                    continue
                run_table(f"outliers_lowrank_{name}{suffix}", {m: o}, common, out / name)
        rows = run_table(f"outliers_lowrank_{name}{suffix}", methods, common, out / name, collect=True)
        for row in rows:
            rec = json.loads((run_dir_for(out / name, row["method"]) / "metrics.json").read_text())
            m = rec.get("metrics", {})
            row.update({k: m[k] for k in ("params/ratio", "time/allocation_s", "allocation/error_sum",
                                           "allocation/error_sum_uniform") if k in m})
            sparse = [r.get("outliers", 0.0) * r["shape"][0] * r["shape"][1] for r in rec.get("layers", [])]
            if any(sparse):
                row["outlier_fraction"] = sum(sparse) / sum(r["shape"][0] * r["shape"][1] for r in rec["layers"])
        if rows:
            emit(f"outliers_lowrank_{name}{suffix}", rows, meta)


if __name__ == "__main__":
    main()
