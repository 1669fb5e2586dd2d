"""Sweeps through submitit launchers: local processes, and a real SLURM (scripts/slurm-local.sh up)."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import needs_data
from test_sweeps import TINY, records, run


def _slurm_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: bring up a local SLURM with scripts/slurm-local.sh up (root, Debian)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"SLURM controller not responding ({ping.stdout.strip() or ping.stderr.strip()}): scripts/slurm-local.sh up"
    return None


# The README's form: a list of methods plus an option of theirs (the group is null in Hydra's base
# composition of a multirun, so the option only composes through cli.sweep_overrides).
SWEEP = [*TINY, "quantizer=rtn,gptq", "quantizer.bits=3", "quantizer.group_size=32", "logger=none"]


def check_two_methods(recs):
    assert sorted(r["choices"]["quantizer"] for r in recs.values()) == ["gptq", "rtn"], recs
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    assert all(row["bits"] == 3 for r in recs.values() for row in r["layers"])


@needs_data
def test_submitit_local_runs_each_job(tmp_path):
    sweep = tmp_path / "local"
    out = run(["-m", *SWEEP, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-2000:]
    check_two_methods(records(sweep))


@pytest.mark.slurm
@needs_data
def test_slurm_sweep_is_one_job_array(tmp_path):
    reason = _slurm_reason()
    if reason:
        pytest.skip(reason)
    sweep = tmp_path / "slurm"
    out = run(["-m", *SWEEP, "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
               "hydra.launcher.signal_delay_s=30", f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-3000:]
    recs = records(sweep)
    assert len(recs) == 2
    check_two_methods(recs)
    # submitit names array tasks <array id>_<index>: both jobs belong to ONE array
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    array_ids = {t.split("_")[0] for t in tasks}
    assert len(tasks) == 2 and len(array_ids) == 1, tasks
    (array_id,) = array_ids
    acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State"],
                          capture_output=True, text=True)
    rows = [line.split("|") for line in acct.stdout.split()]
    assert sorted(r[0] for r in rows) == [f"{array_id}_0", f"{array_id}_1"], acct.stdout
