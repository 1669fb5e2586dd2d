"""Shared helpers for the benchmark scripts: JSON out, Markdown table out."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

if not os.environ.get("COMPRESSLAB_DATA_DIR"):
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    if shared.is_dir():
        os.environ["COMPRESSLAB_DATA_DIR"] = str(shared)


def emit(name: str, rows: list[dict], meta: dict, merge: bool = False) -> None:
    """Print JSON and write experiments/results/<name>.{json,md}. With `merge`, rows replace the rows of the
    existing file with the same identity (`_row_key`: model, shape, method) and the others are kept (for
    `--only` reruns)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if merge and (RESULTS / f"{name}.json").is_file():
        old = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        new = {_row_key(r): r for r in rows}
        rows = [new.pop(_row_key(r), r) for r in old] + list(new.values())
    payload = {"benchmark": name, "meta": meta, "rows": rows}
    text = json.dumps(payload, indent=2, default=str)
    print(text)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name}", "", f"`{' '.join(sys.argv)}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def _row_key(row: dict) -> tuple:
    """What names a row: its model and shape (where the table has them) and its method."""
    return tuple(row.get(k) for k in ("model", "shape", "method"))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")  # a cell's own "|" would split the row


ROOT = Path(__file__).resolve().parents[2]


def table_args(name: str) -> argparse.ArgumentParser:
    """The options every run_table benchmark takes: --only, --nsamples, --calib-seqlen, --windows, --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="method names to run (default: all)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "outputs" / f"bench_{name}"))
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: tabulate the runs already in --out (e.g. a run stopped after its first rows)")
    return ap


def table_overrides(args) -> list[str]:
    """run.py overrides for those options (quiet, no W&B)."""
    return [f"data.nsamples={args.nsamples}", f"data.seqlen={args.calib_seqlen}", "eval.seqlen=2048",
            f"eval.max_windows={args.windows}", "logger=none", "engine.progress=false", "eval.progress=false"]


def run_dir_for(out: Path, method: str) -> Path:
    """The run directory `run_table` uses for one method name."""
    name = method.replace(" ", "_").replace(":", "").replace("+", "plus").replace("=", "").replace("%", "pct")
    return out / re.sub(r"[^A-Za-z0-9._-]", "", name)  # Hydra's override grammar rejects ( ) , etc.


def run_table(name: str, methods: dict[str, list[str]], common: list[str], out: Path, only=None,
              collect: bool = False) -> list[dict]:
    """Run each method as its own `run.py` process (so peak RSS is per method) and read back
    its metrics.json. Returns one row per method. `collect`: run nothing, read back the methods
    whose run directory already holds a metrics.json."""
    rows = []
    for method, overrides in methods.items():
        if only and method not in only:
            continue
        run_dir = run_dir_for(out, method)
        if collect:
            if (run_dir / "metrics.json").is_file():
                rows.append(row_from_run(method, run_dir))
            continue
        t0 = time.perf_counter()
        # force=true: always recompute (the sweep skip rule keys on the config, not the code)
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides, *common, f"hydra.run.dir={run_dir}",
                               "force=true"],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        row = row_from_run(method, run_dir, time.perf_counter() - t0, proc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def row_from_run(method: str, run_dir: Path, wall: float | None = None, proc=None) -> dict:
    """A table row from a run directory's metrics.json (also for runs made earlier: `--collect`)."""
    rec = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    m = rec.get("metrics", {})
    if wall is None:
        wall = rec.get("time", {}).get("total_s") if isinstance(rec.get("time"), dict) else m.get("time/total_s")
    row = {"method": method, "status": rec.get("status", f"rc={proc.returncode}" if proc else "missing"),
           "ppl/wikitext2": m.get("ppl/wikitext2"), "sparsity": m.get("sparsity"), "avg_bits": m.get("avg_bits"),
           "compress_s": m.get("time/compress_s"), "peak_rss_gb": m.get("memory/peak_rss_gb"),
           "compress_peak_rss_gb": m.get("memory/compress_peak_rss_gb"),
           "process_wall_s": round(wall, 1) if wall is not None else None}
    if rec.get("status") != "ok":
        row["error"] = rec.get("error") or (proc.stderr[-500:] if proc else "no metrics.json")
    return row


def run_child(script: str, spec: dict, method: str) -> dict:
    """Run `script --child <spec as JSON>` in its own process (so peak RSS is its own) and return
    {"method", "status": "ok", **the JSON of its last stdout line}, or a status/error row when it failed."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT / "experiments" / "bench")
    if proc.returncode:
        err = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ""
        return {"method": method, "status": f"rc={proc.returncode}", "error": err}
    return {"method": method, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def parse_or_run_child(ap: argparse.ArgumentParser, child) -> argparse.Namespace:
    """Parse the options; when called as `--child <spec>` (from `run_child`), print child(spec) as
    JSON and exit instead."""
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        sys.exit(0)
    return args

