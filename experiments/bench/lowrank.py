"""Low-rank compensation + recovery table on SmolLM2-135M (issue 6's protocol).

    python experiments/bench/lowrank.py [--only NAME ...] [--nsamples 128 --calib-seqlen 512 --windows 16]

Base: sparsegpt 2:4 + gptq W4 g64 (SmolLM2's widths 576/1536 are multiples of 64, not 128).
Low-rank at rank_ratio 0.1, then recovery (beam offline/online, finetune) on top of slim.
A second table, `lowrank_only`, uses low-rank as compression on its own (no pruner, no quantizer,
C(W)=0): naive vs svd_llm vs asvd at a 20% parameter cut (lowrank.param_ratio=0.8).
Each row is its own `run.py` process; figures come back from each run's metrics.json.
"""

import json
from pathlib import Path

from _common import emit, run_dir_for, run_table, table_args, table_overrides

BASE = ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4", "quantizer.group_size=64"]
R = "lowrank.rank_ratio=0.1"
METHODS = {
    "no low-rank": BASE,
    "naive": [*BASE, "lowrank=naive", R],
    "slim": [*BASE, "lowrank=slim", R],
    "l2qer": [*BASE, "lowrank=l2qer", R],
    "eora": [*BASE, "lowrank=eora", R],
    "svd_llm": [*BASE, "lowrank=svd_llm", R],
    "slim + beam offline": [*BASE, "lowrank=slim", R, "recovery=beam", "recovery.mode=offline"],
    "slim + beam online": [*BASE, "lowrank=slim", R, "recovery=beam", "recovery.mode=online"],
    "slim + finetune": [*BASE, "lowrank=slim", R, "recovery=finetune"],
}
CUT = ["lowrank.param_ratio=0.8", "lowrank.rank_ratio=null"]
LOWRANK_ONLY = {
    "naive 20% cut": ["lowrank=naive", *CUT],
    "svd_llm 20% cut": ["lowrank=svd_llm", *CUT],
    "asvd 20% cut": ["lowrank=asvd", *CUT],
}


def _recovery_summary(run_dir: Path) -> dict:
    """Mean per-block loss before/after recovery, from the run's metrics.json."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    rows = [r for r in json.loads(path.read_text()).get("recovery", []) if "loss_before" in r]
    if not rows:
        return {}
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    out = {"recovery_loss_before": mean("loss_before"), "recovery_loss_after": mean("loss_after")}
    if all("kept" in r for r in rows):  # BEAM: held-out loss of the trained weights, and how many blocks kept them
        out["recovery_loss_trained"] = mean("loss_trained")
        out["blocks_kept_trained"] = f"{sum(r['kept'] == 'trained' for r in rows)}/{len(rows)}"
    return out


def main():
    ap = table_args("lowrank")
    ap.add_argument("--table", choices=["lowrank", "lowrank_only", "both"], default="both")
    args = ap.parse_args()
    common = table_overrides(args)
    meta = {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU, 2 threads",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "times": "compress_s covers compression + recovery; process_wall_s adds model load and eval",
    }
    out = Path(args.out)
    for name, methods, extra in [("lowrank", METHODS, {"base": "sparsegpt 2:4 + gptq W4 g64, rank_ratio 0.1"}),
                                 ("lowrank_only", LOWRANK_ONLY, {"base": "no pruner/quantizer: W replaced by L·R"})]:
        if args.table not in (name, "both"):
            continue
        rows = run_table(name, methods, common, out / name, args.only, args.collect)
        for row in rows:
            run_dir = run_dir_for(out / name, row["method"])
            row.update(_recovery_summary(run_dir))
            rec = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
            for k in ("params/ratio", "params/compressed"):
                if k in rec.get("metrics", {}):
                    row[k] = rec["metrics"][k]
        if rows:
            emit(name, rows, {**meta, **extra}, merge=bool(args.only))


if __name__ == "__main__":
    main()
