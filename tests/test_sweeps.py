"""Sweeps through run.py: presets compose, finished jobs are skipped, a failing job does not stop the
others, the report collects them, and W&B runs carry the sweep as group and the method as job_type."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compresslab.cli import config_hash, finished, method_string, sweep_overrides
from compresslab.errors import ConfigError
from compresslab.launcher import check_slurm_params
from compresslab.report import report
from conftest import needs_data, small_data_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml"))
TINY = ["model=tiny_llama", "data.nsamples=4", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2",
        "engine.progress=false", "eval.progress=false"]


def run(args, cwd=ROOT, env_extra=None, **kw):
    env = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1", **(env_extra or {})}
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


def test_sweep_overrides_force_add_only_options_of_swept_groups():
    args = ["-m", "pruner=magnitude,wanda", "pruner.pattern=2:4", "quantizer=rtn", "quantizer.bits=3",
            "lowrank=choice(naive,slim)", "lowrank.rank=2", "+lowrank.extra=1", "eval.max_windows=2", "model=tiny_llama"]
    assert sweep_overrides(args) == ["-m", "pruner=magnitude,wanda", "++pruner.pattern=2:4", "quantizer=rtn",
                                     "quantizer.bits=3", "lowrank=choice(naive,slim)", "++lowrank.rank=2",
                                     "+lowrank.extra=1", "eval.max_windows=2", "model=tiny_llama"]
    plain = ["pruner=magnitude", "pruner.pattern=2:4", "quantizer.bits=3,4"]
    assert sweep_overrides(plain) == plain  # nothing swept at the group level: Hydra's own strict checks
    # a bare null is None to Hydra, not a group choice: quoted, it selects conf/<group>/null.yaml
    assert sweep_overrides(["lowrank=null", "-m", "pruner=null,magnitude", "quantizer='null',rtn"]) == [
        "lowrank='null'", "-m", "pruner='null',magnitude", "quantizer='null',rtn"]


def test_null_skips_a_stage_from_the_command_line_and_in_presets(tmp_path):
    out = run(["lowrank=null", "pruner=null", "quantizer=rtn", "--cfg", "job"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lowrank: null" in out.stdout and "pruner: null" in out.stdout and "compresslab.quantizer.rtn.RTN" in out.stdout
    out = run(["+experiment=slim_table", "model=tiny_llama", "pruner=magnitude", "pruner.pattern=2:4",
               "quantizer=rtn", "lowrank=null,naive", "lowrank.rank=2", "quantizer.group_size=32", "logger=none",
               "eval=ppl", *TINY[1:], f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"])
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(tmp_path)
    assert sorted(str(r["choices"]["lowrank"]) for r in recs.values()) == ["None", "naive"], recs
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]


@needs_data
def test_readme_sweep_form_carries_method_options_in_every_group(tmp_path):
    """`-m <group>=a,b <group>.<option>=v` for pruner, quantizer, lowrank, recovery and eval (the
    README's form): in the base composition the swept group is still null, so before the fix every
    one of these stopped with "Key '<group>' is not in struct" before any job ran."""
    small = {"COMPRESSLAB_DATA_DIR": str(small_data_dir(tmp_path / "data"))}  # seconds per job, not minutes
    sweep = tmp_path / "methods"
    out = run(["-m", *TINY, "logger=none", "pruner=magnitude,wanda", "pruner.pattern=2:4", "quantizer=rtn,gptq",
               "quantizer.bits=3", "quantizer.group_size=32", "lowrank=null,slim", "lowrank.rank=2",
               f"hydra.sweep.dir={sweep}"], env_extra=small)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(sweep)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values()), {k: r["error"] for k, r in recs.items()}
    seen = set()
    for r in recs.values():
        c, layers = r["config"], r["layers"]
        seen.add((r["choices"]["pruner"], r["choices"]["quantizer"], r["choices"]["lowrank"]))
        assert c["pruner"]["pattern"] == "2:4" and all(row["nm_valid"] for row in layers)
        assert c["quantizer"]["bits"] == 3 and all(row["bits"] == 3 for row in layers)
        assert (c["lowrank"] is None) == (r["choices"]["lowrank"] is None)
        assert all(row.get("rank") == (2 if c["lowrank"] else None) for row in layers)
    assert len(seen) == 8

    sweep = tmp_path / "rec_eval"
    out = run(["-m", *TINY[:3], "engine.progress=false", "logger=none", "quantizer=rtn", "quantizer.group_size=32", "recovery=null,beam",
               "recovery.epochs=1", "recovery.batch_size=2", "eval=ppl,zeroshot", "eval.dense_baseline=true",
               f"hydra.sweep.dir={sweep}"], env_extra=small)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(sweep)
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs.values()), {k: r["error"] for k, r in recs.items()}
    for r in recs.values():
        m = r["metrics"]
        if r["choices"]["recovery"] == "beam":
            assert r["config"]["recovery"]["epochs"] == 1 and len(r["recovery"]) == 2
        else:
            assert r["config"]["recovery"] is None and not r["recovery"]
        key = "ppl/wikitext2" if r["choices"]["eval"] == "ppl" else "zeroshot/avg/acc"
        assert key in m and "dense/" + key in m  # eval.dense_baseline reached both evaluators


def test_an_option_the_swept_method_lacks_fails_with_the_valid_ones(tmp_path):
    sweep = tmp_path / "typo"
    out = run(["-m", "model=tiny_llama", "logger=none", "pruner=magnitude,wanda", "pruner.patern=2:4",
               f"hydra.sweep.dir={sweep}"])
    recs = records(sweep)
    assert len(recs) == 2 and all(r["status"] == "failed" for r in recs.values())
    for r in recs.values():
        assert "patern" in r["error"] and "pattern" in r["error"] and "sparsity" in r["error"]


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
    check_slurm_params({**ok, "tasks_per_node": 4, "gpus_per_node": 4, "nodes": 2})
    check_slurm_params({**ok, "tasks_per_node": 2, "gpus_per_node": 0})  # CPU ranks
    with pytest.raises(ConfigError, match="tasks_per_node=4 ranks on gpus_per_node=2 GPUs.*gpus_per_node=4"):
        check_slurm_params({**ok, "tasks_per_node": 4, "gpus_per_node": 2})
    with pytest.raises(ConfigError, match="nodes=0 must be >= 1"):
        check_slurm_params({**ok, "nodes": 0})


def test_slurm_launcher_rejects_a_short_timeout_before_submitting(tmp_path):
    out = run(["-m", "model=tiny_llama", "hydra/launcher=slurm", "hydra.launcher.timeout_min=2",
               f"hydra.sweep.dir={tmp_path / 's'}"])
    assert out.returncode != 0
    assert "timeout_min=2" in out.stderr and "signal_delay_s" in out.stderr
    assert not (tmp_path / "s" / ".submitit").exists()
