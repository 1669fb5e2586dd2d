"""Print the per-layer table of a run (its metrics.json) or of saved weights (safetensors).

    python -m compresslab.check_sparsity outputs/2026-11-25/12-00-00
    python -m compresslab.check_sparsity path/to/model_dir_or_file.safetensors [--pattern 2:4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .pruner.masks import nm_valid, parse_pattern


def rows_from_run(path: Path) -> list[dict]:
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        print(f"note: this run's status is {record.get('status')}: {record.get('error')}", file=sys.stderr)
    return record.get("layers") or []


def rows_from_safetensors(files: list[Path], pattern: str | None) -> list[dict]:
    from safetensors import safe_open

    nm = parse_pattern(pattern) if pattern else (2, 4)
    rows = []
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if not key.endswith(".weight") or "embed" in key or "norm" in key or "lm_head" in key:
                    continue
                w = st.get_tensor(key)
                if w.dim() != 2:
                    continue
                nz = w != 0
                rows.append({"name": key[: -len(".weight")], "shape": list(w.shape),  # no mask here: zeros only
                             "zero_fraction": 1 - nz.float().mean().item(),
                             "nm_valid": nm_valid(nz, nm) if w.shape[1] % nm[1] == 0 else None})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [c for c in ("name", "shape", "sparsity", "zero_fraction", "nm_valid", "pattern", "bits", "group_size",
                        "grid", "avg_bits", "rel_error", "rel_error_oneshot", "damp", "fallback")
            if any(c in r for r in rows)]
    fmt = {"sparsity": "{:.4f}", "zero_fraction": "{:.4f}", "avg_bits": "{:.3f}", "rel_error": "{:.4f}",
           "rel_error_oneshot": "{:.4f}", "damp": "{:g}"}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if c == "shape":
            return "x".join(map(str, v))
        return fmt[c].format(v) if c in fmt else str(v)

    table = [cols] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    if rows:
        total = sum(r["shape"][0] * r["shape"][1] for r in rows)
        overall = []
        for key, label in (("sparsity", "sparsity (pruned)"), ("zero_fraction", "zero fraction")):
            if all(key in r for r in rows):
                overall.append(f"{label} {sum(r[key] * r['shape'][0] * r['shape'][1] for r in rows) / total:.4f}")
        lines.append(f"\n{len(rows)} layers, overall " + ", ".join(overall))
        if any(r.get("fallback") for r in rows):
            lines.append("OBS fell back to the diagonal (no error propagation) in: "
                         + ", ".join(r["name"] for r in rows if r.get("fallback")))
        if any(r.get("nm_valid") is False for r in rows):
            lines.append("N:M pattern VIOLATED in: " + ", ".join(r["name"] for r in rows if r.get("nm_valid") is False))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compresslab.check_sparsity", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="a run directory (with metrics.json), a metrics.json, or safetensors file/folder")
    ap.add_argument("--pattern", default=None, help="N:M pattern to verify on safetensors weights (default 2:4)")
    args = ap.parse_args(argv)
    p = Path(args.path)
    if p.is_dir() and (p / "metrics.json").is_file():
        p = p / "metrics.json"
    if p.suffix == ".json" and p.is_file():
        rows = rows_from_run(p)
    elif p.is_dir() and list(p.glob("*.safetensors")):
        rows = rows_from_safetensors(sorted(p.glob("*.safetensors")), args.pattern)
    elif p.suffix == ".safetensors" and p.is_file():
        rows = rows_from_safetensors([p], args.pattern)
    else:
        print(f"error: {p} is not a run directory, a metrics.json or safetensors weights", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
