"""Shared helpers for the benchmark scripts: JSON out, Markdown table out."""

import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

if not os.environ.get("COMPRESSLAB_DATA_DIR"):
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    if shared.is_dir():
        os.environ["COMPRESSLAB_DATA_DIR"] = str(shared)


def emit(name: str, rows: list[dict], meta: dict) -> None:
    """Print JSON and write experiments/results/<name>.{json,md}."""
    RESULTS.mkdir(parents=True, exist_ok=True)
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


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
