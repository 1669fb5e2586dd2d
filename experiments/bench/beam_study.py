"""BEAM on the four-stage SmolLM2 pipeline: does recovery pay, in perplexity and zero-shot accuracy?

    python experiments/bench/beam_study.py [--limit 100] [--windows 16] [--only NAME ...]

Pipeline: sparsegpt 2:4 + gptq W4 g64 + slim (rank_ratio 0.1), 128×512 wikitext2 calibration; then
no recovery, BEAM (its defaults; with lr_search; with more epochs at the lr the search picked most
often) and adapter finetune. Each row: wikitext2 ppl (seqlen 2048, first `--windows` windows) and
zero-shot accuracy on piqa, arc_easy, arc_challenge, winogrande, boolq, hellaswag — the first
`--limit` documents of each, the same documents for every row (lm-eval takes the first N). The first
row also evaluates the dense model. Writes experiments/results/beam_study.{json,md}.
"""

import json
from collections import Counter
from pathlib import Path

from _common import ROOT, emit, row_from_run, run_dir_for, run_table, table_args

BASE = ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4", "quantizer.group_size=64",
        "lowrank=slim", "lowrank.rank_ratio=0.1"]
TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "hellaswag"]


def recovery_summary(rec: dict) -> dict:
    rows = [r for r in rec.get("recovery", []) if "loss_before" in r]
    if not rows:
        return {}
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    out = {"loss_before": mean("loss_before"), "loss_trained": mean("loss_trained"), "loss_after": mean("loss_after"),
           "kept_trained": f"{sum(r['kept'] == 'trained' for r in rows)}/{len(rows)}"}
    lrs = Counter(r["lr"] for r in rows)
    out["lr_picked"] = ", ".join(f"{lr:g}×{n}" for lr, n in lrs.most_common())
    return out


def main():
    ap = table_args("beam_study")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--long-epochs", type=int, default=8)
    ap.add_argument("--lr-grid", type=float, nargs="+", help="the lr_search row's grid (default: BEAM's)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline in the first row")
    ap.add_argument("--long-lr", type=float, help="the long row's lr (default: the one lr_search picked most often)")
    args = ap.parse_args()
    # a reduced calibration gets its own table: its rows are not comparable with the 128x512 ones
    args.table = "beam_study" if (args.nsamples, args.calib_seqlen) == (128, 512) else \
        f"beam_study_{args.nsamples}x{args.calib_seqlen}"
    if args.out == ap.get_default("out"):
        args.out = str(ROOT / "outputs" / f"bench_{args.table}")
    out = Path(args.out)
    common = [f"data.nsamples={args.nsamples}", f"data.seqlen={args.calib_seqlen}", "eval=full", "eval.ppl.seqlen=2048",
              f"eval.ppl.max_windows={args.windows}", f"eval.zeroshot.limit={args.limit}",
              f"eval.zeroshot.tasks=[{','.join(TASKS)}]", "logger=none", "engine.progress=false",
              "eval.ppl.progress=false"]
    methods = {
        "slim (no recovery)": [*BASE, f"eval.dense_baseline={str(not args.no_dense).lower()}"],
        "beam (epochs 2, lr 1e-4)": [*BASE, "recovery=beam"],
        "beam lr_search (epochs 2)": [*BASE, "recovery=beam", "recovery.lr_search=true",
                                      *([f"recovery.lr_grid=[{','.join(f'{v:g}' for v in args.lr_grid)}]"]
                                        if args.lr_grid else [])],
        "finetune (50 steps)": [*BASE, "recovery=finetune"],
    }
    if args.collect:
        if args.long_lr:
            methods[f"beam (epochs {args.long_epochs}, lr {args.long_lr:g})"] = []
        rows = [row_from_run(m, run_dir_for(out, m)) for m in methods if (run_dir_for(out, m) / "metrics.json").is_file()]
        emit_rows(rows, out, args)
        return
    rows = run_table(args.table, methods, common, out, args.only)
    # more epochs at the lr the search picked most often
    search = run_dir_for(out, "beam lr_search (epochs 2)") / "metrics.json"
    if (search.is_file() or args.long_lr) and (not args.only or any("epochs" in o and "search" not in o
                                                                    for o in args.only)):
        if args.long_lr:
            lr = args.long_lr
        else:
            lrs = Counter(r["lr"] for r in json.loads(search.read_text()).get("recovery", []) if "lr" in r)
            lr = lrs.most_common(1)[0][0]
        name = f"beam (epochs {args.long_epochs}, lr {lr:g})"
        rows += run_table(args.table, {name: [*BASE, "recovery=beam", f"recovery.epochs={args.long_epochs}",
                                                f"recovery.lr={lr}"]}, common, out)
    emit_rows(rows, out, args)


def emit_rows(rows, out, args):
    for row in rows:
        rec = json.loads((run_dir_for(out, row["method"]) / "metrics.json").read_text())
        m = rec.get("metrics", {})
        for t in TASKS:
            row[t] = m.get(f"zeroshot/{t}/acc")
        row["zeroshot_avg"] = m.get("zeroshot/avg/acc")
        if "dense/ppl/wikitext2" in m:
            row["dense ppl"] = m["dense/ppl/wikitext2"]
            row["dense zeroshot_avg"] = m.get("dense/zeroshot/avg/acc")
            for t in TASKS:
                row[f"dense {t}"] = m.get(f"dense/zeroshot/{t}/acc")
        row.update(recovery_summary(rec))
    emit(args.table, rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU, 2 threads",
        "pipeline": "sparsegpt 2:4 + gptq W4 g64 + slim rank_ratio 0.1 (fp16 adapters)",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test seqlen 2048 first {args.windows} windows; zero-shot: first {args.limit} docs of "
                f"each task (the same docs in every row), acc",
        "beam": "online; loss_* are mean per-block held-out MSE (val_fraction 0.125): before training, of the "
                "trained weights, and of the weights kept (the one-shot ones when training made it worse)"
                + (f"; lr_search grid {args.lr_grid}" if args.lr_grid else ""),
    }, merge=bool(args.only))


if __name__ == "__main__":
    main()
