"""Sweeps through run.py: presets compose, finished jobs are skipped, a failing job does not stop the
others, the report collects them, and W&B runs carry the sweep as group and the method as job_type."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compresslab.cli import config_hash, finished, method_string
from compresslab.errors import ConfigError
from compresslab.launcher import check_slurm_params
from compresslab.report import report
from conftest import needs_data

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml"))
TINY = ["model=tiny_llama", "data.nsamples=4", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2",
        "engine.progress=false", "eval.progress=false"]


def run(args, cwd=ROOT, **kw):
    env = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def records(sweep: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(sweep)): json.loads(p.read_text()) for p in sweep.rglob("metrics.json")}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_into_sweeps(preset, tmp_path):
    """Each preset is a MULTIRUN with a fixed sweep dir, found from any working directory."""
    out = run([f"+experiment={preset}", "--cfg", "hydra"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mode: MULTIRUN" in out.stdout and f"dir: multirun/{preset}" in out.stdout


def test_method_string_and_hash():
    assert method_string({"pruner": "sparsegpt", "quantizer": "gptq", "lowrank": "slim", "recovery": "beam"}) \
        == "sparsegpt+gptq+slim+beam"
    assert method_string({"pruner": None, "quantizer": "rtn"}) == "rtn"
    assert method_string({}) == "dense"
    a = {"quantizer": {"bits": 4}, "force": False, "logger": {"mode": "offline"}}
    assert config_hash(a) == config_hash({**a, "force": True, "logger": None})  # neither changes the result
    assert config_hash(a) != config_hash({**a, "quantizer": {"bits": 3}})


@needs_data
def test_sweep_skips_done_jobs_and_survives_a_failure(tmp_path):
    sweep = tmp_path / "sw"
    # bits=1 is out of range: that job fails, the other runs.
    args = ["-m", *TINY, "quantizer=rtn", "quantizer.bits=4,1", "quantizer.group_size=32", "logger=none",
            f"hydra.sweep.dir={sweep}"]
    out = run(args)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(sweep)
    by_bits = {r["config"]["quantizer"]["bits"]: r for r in recs.values()}
    assert by_bits[4]["status"] == "ok" and by_bits[1]["status"] == "failed"
    assert "bits" in by_bits[1]["error"]
    assert by_bits[4]["method"] == "rtn" and by_bits[4]["config_hash"]
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.rglob("metrics.json")}

    again = run(args)
    assert again.returncode == 0
    assert again.stdout.count("skipped, already done") == 1  # the ok job; the failed one is redone
    for p, t in mtimes.items():
        rec = json.loads(p.read_text())
        assert (p.stat().st_mtime_ns == t) == (rec["status"] == "ok")

    forced = run([*args, "force=true"])
    assert "skipped" not in forced.stdout

    made = report(sweep, tmp_path / "rep")
    md = Path(made["md"]).read_text()
    assert "1 ok, 1 failed" in md and "bits" in md
    import csv

    csv_rows = list(csv.DictReader(open(made["csv"])))
    assert sorted(r["status"] for r in csv_rows) == ["failed", "ok"]
    assert Path(made["ppl_vs_bits"]).stat().st_size > 1000


def test_finished_needs_ok_and_same_hash(tmp_path):
    p = tmp_path / "metrics.json"
    assert not finished(p, "abc")
    p.write_text(json.dumps({"status": "ok", "config_hash": "abc"}))
    assert finished(p, "abc") and not finished(p, "abd")
    p.write_text(json.dumps({"status": "failed", "config_hash": "abc"}))
    assert not finished(p, "abc")
    p.write_text("{ truncated")
    assert not finished(p, "abc")


@needs_data
def test_wandb_run_per_job_with_group_and_job_type(tmp_path):
    from compresslab.logger.wandb import read_offline_run

    sweep = tmp_path / "grp"
    out = run(["-m", *TINY, "quantizer=rtn", "quantizer.bits=4", "quantizer.group_size=32", "logger.mode=offline",
               f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = sweep.glob("*/wandb/offline-run-*")
    got = read_offline_run(str(run_dir))
    assert got["config"]["quantizer"]["bits"] == 4
    rec = next(iter(records(sweep).values()))
    assert got["summary"]["avg_bits"] == pytest.approx(rec["metrics"]["avg_bits"])
    assert got["run"]["group"] == str(sweep) and got["run"]["job_type"] == "rtn"
    assert got["summary"]["layers/nrows"] == len(rec["layers"]) == 14  # the per-layer wandb.Table


def test_slurm_settings_are_checked():
    ok = {"timeout_min": 60, "signal_delay_s": 120, "gpus_per_node": 1, "array_parallelism": 4}
    check_slurm_params(ok)
    with pytest.raises(ConfigError, match="timeout_min=3 .*signal_delay_s=120"):
        check_slurm_params({**ok, "timeout_min": 3})
    with pytest.raises(ConfigError, match="gpus_per_node"):
        check_slurm_params({**ok, "gpus_per_node": -1})


def test_slurm_launcher_rejects_a_short_timeout_before_submitting(tmp_path):
    out = run(["-m", "model=tiny_llama", "hydra/launcher=slurm", "hydra.launcher.timeout_min=2",
               f"hydra.sweep.dir={tmp_path / 's'}"])
    assert out.returncode != 0
    assert "timeout_min=2" in out.stderr and "signal_delay_s" in out.stderr
    assert not (tmp_path / "s" / ".submitit").exists()
