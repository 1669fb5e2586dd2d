"""Collect a sweep's metrics.json files into one table and two plots.

    python -m compresslab.report <sweep dir> [--out experiments/results/<name>]

Writes <out>.md and <out>.csv (one row per job: method, model, settings, metrics; failed jobs listed
with their error) and <out>_ppl_vs_bits.png, <out>_acc_vs_sparsity.png. <out> defaults to <sweep dir>/report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

SETTINGS = {  # column -> (config group, key)
    "rotation": ("rotation", "_target_"), "allocation": ("allocation", "_target_"),  # the method's class, lowercased
    "pattern": ("pruner", "pattern"), "sparsity_target": ("pruner", "sparsity"), "bits": ("quantizer", "bits"),
    "group_size": ("quantizer", "group_size"), "rank_ratio": ("lowrank", "rank_ratio"),
    "recovery_mode": ("recovery", "mode"), "granularity": ("recovery", "block_granularity"),
    "optimizer": ("recovery", "optimizer"),
}
METRICS = ("ppl/wikitext2", "zeroshot/avg/acc", "sparsity", "avg_bits", "params/ratio", "time/compress_s",
           "time/total_s")


def collect(sweep_dir: Path) -> list[dict]:
    """One row per metrics.json under `sweep_dir`, sorted by job folder."""
    rows = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            rows.append({"job": str(path.parent.relative_to(sweep_dir)), "status": f"unreadable ({e})"})
            continue
        cfg, m = rec.get("config") or {}, rec.get("metrics") or {}
        model = cfg.get("model") or {}
        row = {"job": str(path.parent.relative_to(sweep_dir)) or ".", "status": rec.get("status"),
               "method": rec.get("method") or _method_from_config(cfg),
               "model": model.get("name") or model.get("name_or_path") if isinstance(model, dict) else model}
        for col, (group, key) in SETTINGS.items():
            if isinstance(cfg.get(group), dict) and key in cfg[group]:
                v = cfg[group][key]
                row[col] = v.rsplit(".", 1)[-1].lower() if key == "_target_" else v
        for k in METRICS:
            if k in m:
                row[k] = m[k]
        for k, v in m.items():
            if k.startswith("zeroshot/") and k.endswith("/acc") and k != "zeroshot/avg/acc":
                row[k] = v
        if rec.get("status") != "ok":
            row["error"] = " ".join((rec.get("error") or "").split())[:300]
        rows.append(row)
    return rows


def _method_from_config(cfg: dict) -> str:
    parts = []
    for g in ("rotation", "allocation", "pruner", "quantizer", "lowrank", "recovery"):
        target = (cfg.get(g) or {}).get("_target_") if isinstance(cfg.get(g), dict) else None
        if target:
            parts.append(target.rsplit(".", 1)[-1].lower())
    return "+".join(parts) or "dense"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: Path, title: str) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "error"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"])
        w.writeheader()
        w.writerows(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    lines = [f"# {title}", "", f"{len(ok)} ok, {len(failed)} failed or unfinished.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in ok]
    if failed:
        lines += ["", "## Failed or unfinished", ""]
        lines += [f"- `{r['job']}` ({r.get('method')}): {r.get('status')} — {r.get('error', '')}" for r in failed]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _scatter(rows, x, y, path: Path, title: str, logy: bool) -> bool:
    pts = [(r[x], r[y], r.get("method", "?")) for r in rows
           if r.get("status") == "ok" and isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({p[2] for p in pts}):
        xs, ys = zip(*[(a, b) for a, b, m in pts if m == method])
        ax.scatter(xs, ys, label=method, s=36)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir} is not a folder; pass a sweep dir such as multirun/slim_table")
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"no metrics.json under {sweep_dir}; did the sweep run?")
    out = Path(out) if out else sweep_dir / "report"
    write_tables(rows, out, f"{sweep_dir.name}: {len(rows)} jobs")
    made = {"md": str(out.with_suffix(".md")), "csv": str(out.with_suffix(".csv"))}
    for x, y, name, logy in [("avg_bits", "ppl/wikitext2", "ppl_vs_bits", True),
                             ("sparsity", "zeroshot/avg/acc", "acc_vs_sparsity", False)]:
        png = out.parent / f"{out.name}_{name}.png"
        if _scatter(rows, x, y, png, f"{sweep_dir.name}: {y} vs {x}", logy):
            made[name] = str(png)
    return made


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m compresslab.report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", help="output path prefix (default: <sweep dir>/report)")
    args = ap.parse_args(argv)
    for kind, path in report(args.sweep_dir, args.out).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
