"""The glue behind run.py: instantiate the composed config into a Pipeline and run it."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("compresslab")

GROUPS = ("model", "data", "pruner", "quantizer", "lowrank", "recovery", "eval", "logger")


def build_pipeline(cfg: DictConfig):
    """Pipeline(**groups) via hydra's instantiate; a null group is a skipped stage."""
    from hydra.utils import instantiate

    spec = {"_target_": "compresslab.pipeline.Pipeline", "seed": cfg.get("seed", 0)}
    for g in GROUPS:
        spec[g] = cfg.get(g)
    if cfg.get("engine") is not None:
        spec["engine"] = cfg.engine
    return instantiate(OmegaConf.create(spec, flags={"allow_objects": True}), _convert_="all")


def run_from_config(cfg: DictConfig, output_dir: str | Path) -> int:
    """Run one job; metrics.json is written in `output_dir` whatever happens. Returns an exit code."""
    from .metrics import environment, write_json_atomic

    output_dir = Path(output_dir)
    path = output_dir / "metrics.json"
    config = OmegaConf.to_container(cfg, resolve=True)
    for g in GROUPS:  # a skipped stage shows as null
        config.setdefault(g, None)
    pipeline = None
    try:
        pipeline = build_pipeline(cfg)
        log.info("pipeline: model=%s stages=%s recovery=%s", pipeline.model_loader, pipeline.stages, pipeline.recovery)
        record = pipeline.run(output_dir, config)
        m = record["metrics"]
        shown = {k: round(v, 4) for k, v in m.items() if k.startswith(("ppl/", "dense/ppl/", "sparsity", "avg_bits"))}
        log.info("results: %s", shown)
        code = 0
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then reported
        if pipeline is None:  # failed while instantiating: nothing else wrote metrics.json
            write_json_atomic(path, {"status": "failed", "error": f"{type(e).__name__}: {e}", "config": config,
                                     "metrics": {}, "traceback": traceback.format_exc(), "env": environment()})
        from .errors import ConfigError

        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            log.error("%s", cause)
        else:
            log.error("run failed:\n%s", traceback.format_exc())
        code = 1
    print(f"metrics: {path}", flush=True)
    return code
