import pytest
import torch

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.logger.wandb import WandbLogger, read_offline_run
from compresslab.models.loaders import TinyModel
from compresslab.pipeline import Pipeline
from compresslab.quantizer.rtn import RTN


def test_offline_run_holds_summary_and_config(tmp_path):
    p = Pipeline(model=TinyModel(device="cpu"), quantizer=RTN(bits=4, group_size=32),
                 logger=WandbLogger(mode="offline", project="t", group="sweep-a"),
                 engine=SequentialEngine("cpu", progress=False))
    record = p.run(tmp_path, config={"quantizer": {"bits": 4}, "model": "tiny"})
    (run,) = tmp_path.glob("wandb/offline-run-*")
    got = read_offline_run(str(run))
    assert got["config"]["quantizer"] == {"bits": 4}
    assert got["summary"]["avg_bits"] == pytest.approx(record["metrics"]["avg_bits"])
    assert got["summary"]["sparsity"] == pytest.approx(record["metrics"]["sparsity"])


def test_failed_run_still_finishes_and_records(tmp_path):
    class Boom(RTN):
        def compress(self, name, layer, stats=None):
            raise RuntimeError("boom")

    p = Pipeline(model=TinyModel(device="cpu"), quantizer=Boom(bits=4), logger=WandbLogger(mode="offline"),
                 engine=SequentialEngine("cpu", progress=False))
    with pytest.raises(RuntimeError, match="boom"):
        p.run(tmp_path, config={})
    import json

    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: boom"
    assert p.logger.run is None  # finished


def test_bad_mode():
    with pytest.raises(ConfigError, match="logger.mode"):
        WandbLogger(mode="sometimes")
