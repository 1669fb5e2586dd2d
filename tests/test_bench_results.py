"""The committed benchmark results parse, and `emit(merge=True)` keeps rows that differ only in shape."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_json_parses(path):
    payload = json.loads(path.read_text())
    assert isinstance(payload, (dict, list)) and payload, path  # a table (dict) or a list of runs


def _common(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "experiments" / "bench" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    return mod


def test_emit_merge_keys_rows_by_shape_and_method(tmp_path, monkeypatch):
    common = _common(tmp_path, monkeypatch)
    common.emit("t", [{"shape": "a", "method": "m", "v": 1}, {"shape": "b", "method": "m", "v": 2}], {})
    common.emit("t", [{"shape": "b", "method": "m", "v": 3}, {"shape": "c", "method": "m", "v": 4}], {}, merge=True)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["shape"], r["v"]) for r in rows] == [("a", 1), ("b", 3), ("c", 4)]
    assert (tmp_path / "t.md").read_text().count("| m |") == 3
