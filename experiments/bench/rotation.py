"""What a rotation buys each method on SmolLM2: rotation=null, quarot, spinquant in front of W4A4,
low-bit GPTQ, SliM-LLM and 2:4 pruning.

    python experiments/bench/rotation.py [--nsamples 128] [--windows 16] [--spin-iters 20] [--only CELL ...]

Each cell runs three times (`run.py` processes, 128x512 wikitext2 calibration, ppl on the first
`--windows` 2048-token test windows). SpinQuant learns one rotation per training setting (weight bits,
group, activation bits) in the first cell that needs it (its `iters` scaled by --spin-iters for CPU time);
the other cells with the same setting reuse the saved matrices (`rotation.path=`), as a user would.
Writes experiments/results/rotation.{json,md} (one row per cell) and rotation_runs.json (every run) at the
issue's protocol (128x512, 16 windows, 20 SpinQuant steps); other settings write rotation_<N>x<T>_w<W>.*
(e.g. the reduced rotation_32x512_w8.*), so a reduced run never overwrites the full table.
Runs whose folder under --out already holds an ok metrics.json are kept, not rerun (delete one to redo it).
"""

import json
from pathlib import Path

from _common import RESULTS, ROOT, emit, row_from_run, run_dir_for, run_table, table_args, table_overrides

G64 = ["quantizer.group_size=64"]
CELLS = {  # name -> (overrides, SpinQuant's training setting: (bits, group, act_bits))
    "rtn W4A4 g64": (["quantizer=rtn", "quantizer.bits=4", *G64, "quantizer.act_bits=4"], (4, 64, 4)),
    "gptq W4A4 g64": (["quantizer=gptq", "quantizer.bits=4", *G64, "quantizer.act_bits=4"], (4, 64, 4)),
    "sparsegpt 2:4 + gptq W4 g64": (["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4",
                                     *G64], (4, 64, None)),
    "wanda 2:4": (["pruner=wanda", "pruner.pattern=2:4"], (4, 64, None)),
    "gptq W3 g64": (["quantizer=gptq", "quantizer.bits=3", *G64], (3, 64, None)),
    "gptq W2 g64": (["quantizer=gptq", "quantizer.bits=2", *G64], (2, 64, None)),
    "slim_llm W2 g64": (["quantizer=slim_llm", "quantizer.bits=2", *G64], (2, 64, None)),
}
ROTATIONS = ("null", "quarot", "spinquant")


def main():
    ap = table_args("rotation")
    ap.add_argument("--spin-iters", type=int, default=20, help="SpinQuant's Cayley SGD steps (paper: 100)")
    ap.add_argument("--rotations", nargs="+", default=list(ROTATIONS))
    args = ap.parse_args()
    if args.out == ap.get_default("out"):
        args.out = str(ROOT / "outputs" / "bench_rotation")
    out = Path(args.out)
    if args.collect:
        collect(out, args)
        return
    common = ["eval=ppl", *table_overrides(args)]
    cells = [c for c in CELLS if not args.only or c in args.only]
    kept = committed_runs(args)
    trained: dict[tuple, Path] = {}  # SpinQuant setting -> the file its first run saved
    for setting_cell in CELLS:  # rotations learned by an earlier invocation are reused
        f = run_dir_for(out, f"{setting_cell} | spinquant") / "spinquant.safetensors"
        if f.is_file():
            trained.setdefault(CELLS[setting_cell][1], f)
    first = True
    for cell in cells:
        overrides, setting = CELLS[cell]
        for rot in args.rotations:
            name = f"{cell} | {rot}"
            extra = [f"rotation={rot}"]
            if rot == "spinquant":
                bits, group, act = setting
                extra += [f"rotation.bits={bits}", f"rotation.group_size={group}",
                          f"rotation.act_bits={'null' if act is None else act}", f"rotation.iters={args.spin_iters}"]
                if setting in trained:
                    extra.append(f"rotation.path={trained[setting]}")
            done = run_dir_for(out, name) / "metrics.json"
            if done.is_file() and json.loads(done.read_text()).get("status") == "ok" or name in kept:
                first = False  # an earlier invocation's run, here or in the committed runs file
                continue
            if first:
                extra.append("eval.dense_baseline=true")
                first = False
            run_table("rotation", {name: [*overrides, *extra]}, common, out)
            if rot == "spinquant" and setting not in trained:
                f = run_dir_for(out, name) / "spinquant.safetensors"
                if f.is_file():
                    trained[setting] = f
    collect(out, args)


def output_name(args) -> str:
    """`rotation` at the issue's protocol, else a name that says the reduced one."""
    full = (args.nsamples, args.calib_seqlen, args.windows, args.spin_iters) == (128, 512, 16, 20)
    return "rotation" if full else f"rotation_{args.nsamples}x{args.calib_seqlen}_w{args.windows}"


def runs_file(args) -> Path:
    """Every run's record for this protocol (rotation_runs*.json beside the table)."""
    return RESULTS / f"{output_name(args).replace('rotation', 'rotation_runs', 1)}.json"


def committed_runs(args) -> dict[str, dict]:
    """The ok runs of the committed runs file for this protocol, by method: a later session (whose --out
    folders are gone) keeps them instead of running them again; delete a run from the file to redo it."""
    f = runs_file(args)
    runs = json.loads(f.read_text()) if f.is_file() else []
    return {r["method"]: r for r in runs if r.get("status") == "ok"}


def collect(out: Path, args) -> None:
    """One row per cell from every run directory present (also runs of earlier invocations) and, for the
    runs with no folder here, the committed runs file's record."""
    kept = committed_runs(args)
    runs, rows, dense = [], [], None
    for cell in CELLS:
        row = {"method": cell}
        for rot in ROTATIONS:
            d = run_dir_for(out, f"{cell} | {rot}")
            if (d / "metrics.json").is_file():
                r = row_from_run(f"{cell} | {rot}", d)
                rec = json.loads((d / "metrics.json").read_text())
                m = rec.get("metrics", {})
                r.update({k: m.get(k) for k in ("time/rotation_s", "rotation/loss_first", "rotation/loss_last")})
                r["rotation_path"] = (rec.get("config") or {}).get("rotation", {}) and rec["config"]["rotation"].get("path")
                r["dense_ppl"] = m.get("dense/ppl/wikitext2")
            elif f"{cell} | {rot}" in kept:
                r = kept[f"{cell} | {rot}"]
            else:
                continue
            runs.append(r)
            dense = r.get("dense_ppl") or dense
            row[f"ppl {rot}"] = r["ppl/wikitext2"] if r["status"] == "ok" else r["status"]
            if rot != "null" and r.get("time/rotation_s") is not None:
                row[f"{rot} s"] = round(r["time/rotation_s"], 1)
                row[f"{rot} compress_s"] = r["compress_s"]  # R4's online transform runs in every forward
                if rot == "spinquant":
                    row["spinquant"] = "reused" if r.get("rotation_path") else "learned here"
            if rot == "null":
                row["compress_s"] = r["compress_s"]
        rows.append(row)
    name = output_name(args)
    table = RESULTS / f"{name}.json"
    meta = json.loads(table.read_text())["meta"] if table.is_file() else {}
    notes = {k: v for k, v in meta.items() if k.startswith("note")}  # written by hand: kept
    dense = dense or meta.get("dense ppl")  # runs recorded before their records carried it
    runs_file(args).write_text(json.dumps(runs, indent=2, default=str) + "\n")
    emit(name, rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "dense ppl": dense,
        "rotations": "quarot: randomised Hadamard R1 (576 = 36x16), R2 (64) per block, online Hadamard R4 "
                     "(1536 = 12x128); spinquant: R1/R2 learned from quarot's start by Cayley SGD "
                     f"({args.spin_iters} steps, lr 1.5, 1 window of {args.calib_seqlen} tokens per step), weights "
                     "RTN at the cell's bits/group and per-token activations at its act_bits during training, "
                     "learned once per setting and reused (rotation.path) by the other cells",
        "columns": "ppl per rotation; '<rotation> s': seconds the rotation step took (learning included where "
                   "'learned here'); compress_s: the engine's time without rotation, '<rotation> compress_s' with it "
                   "(the online Hadamard on down_proj's input runs in every block forward)",
        **notes,
    })


if __name__ == "__main__":
    main()
