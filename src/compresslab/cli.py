"""The glue behind run.py: instantiate the composed config into a Pipeline and run it."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("compresslab")

GROUPS = ("model", "data", "rotation", "allocation", "pruner", "quantizer", "lowrank", "recovery", "eval", "logger")


def register_hydra_plugins(root: str | Path) -> None:
    """Register the project's Hydra plugins by hand (Hydra's own scan does not see editable installs):
    the `hydra/launcher=slurm` launcher, and a search path entry for `<root>/experiments`, so that
    `+experiment=<name>` finds experiments/experiment/<name>.yaml from any working directory."""
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    from hydra_plugins.compresslab_launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)
    presets = Path(root).resolve() / "experiments"

    class ExperimentPresets(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            search_path.append(provider="compresslab-experiments", path=f"file://{presets}")

    Plugins.instance().register(ExperimentPresets)


STAGE_GROUPS = ("rotation", "allocation", "pruner", "quantizer", "lowrank", "recovery")  # the method's groups
NULL_GROUPS = (*STAGE_GROUPS, "eval")  # groups with a conf/<group>/null.yaml


def rank_overrides(environ=None) -> list[str]:
    """Under torchrun / srun with several tasks, every rank runs run.py; rank 0 writes the run's folder,
    the others keep Hydra's files in a temporary folder of their own (distributed.py)."""
    import tempfile

    from .distributed import env_ranks

    found = env_ranks(environ)
    if found is None or found[0] == 0:
        return []
    tmp = tempfile.mkdtemp(prefix=f"compresslab-rank{found[0]}-")
    return [f"hydra.run.dir={tmp}", f"hydra.sweep.dir={tmp}", "hydra.output_subdir=null"]


def sweep_overrides(args: list[str]) -> list[str]:
    """Command-line overrides rewritten so that what the README prints composes in Hydra.

    - `pruner=null` (also inside a sweep, `lowrank=null,slim`): Hydra reads an unquoted null as
      None and rejects it as a group choice, so it is quoted ('null' selects conf/<group>/null.yaml,
      which sets the group to null: no stage).
    - `-m pruner=magnitude,wanda pruner.pattern=2:4`: in a multirun Hydra first composes one base
      config WITHOUT the swept group choices (the group keeps its default, e.g. `pruner: null`), so
      `pruner.pattern` has nothing to override there and the sweep stops before any job runs.
      Written as `++pruner.pattern=2:4`, the option composes in the base config and sets the
      option in every job; `build_pipeline` then rejects an option the chosen method does not have
      (the check Hydra's struct mode makes for a plain override).
    Other arguments pass unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parser = OverridesParser.create()
    parsed = {}
    for i, arg in enumerate(args):
        if "=" in arg and not arg.startswith("-"):
            try:
                parsed[i] = parser.parse_override(arg)
            except Exception:  # noqa: BLE001 - Hydra reports it properly when it parses argv itself
                continue
    out = list(args)
    swept = set()
    for i, o in parsed.items():
        if o.key_or_group not in GROUPS or o.is_delete():
            continue
        if o.is_sweep_override():
            swept.add(o.key_or_group)
        value = o.value()
        if o.key_or_group in NULL_GROUPS and not o.is_add() and not o.is_force_add():
            if value is None:
                out[i] = f"{o.key_or_group}='null'"
            elif isinstance(value, ChoiceSweep) and None in value.list:
                items = ",".join("'null'" if v == "null" else v for v in o.sweep_string_iterator())
                out[i] = f"{o.key_or_group}={items}"  # (Hydra's choice() refuses null itself)
    for i, o in parsed.items():
        group = o.key_or_group.split(".", 1)[0]
        if group in swept and "." in o.key_or_group and not (o.is_add() or o.is_force_add() or o.is_delete()):
            out[i] = "++" + args[i]
    return out


def check_options(key: str, node) -> None:
    """Fail (ConfigError) on an option the `_target_` class does not take, naming the valid ones.

    Hydra's struct mode catches a misspelt option for a plain override, but not for the force-adds
    of `sweep_overrides`, nor for an option a sweep carries to a method that lacks it."""
    import inspect

    from hydra.utils import get_object

    from .errors import ConfigError

    if not isinstance(node, DictConfig):
        return
    for k in node:
        if isinstance(node.get(k), DictConfig):
            check_options(f"{key}.{k}", node[k])
    target = node.get("_target_")
    if target is None:
        return
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ValueError, TypeError, ImportError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in node if not str(k).startswith("_") and k not in params]
    if unknown:
        valid = [p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
        raise ConfigError(f"{key} ({target.rsplit('.', 1)[-1]}) has no option(s) {', '.join(unknown)}; "
                          f"its options are {', '.join(valid)} (see conf/{key.split('.')[0]}/)")


def drop_null_group_options(cfg: DictConfig) -> None:
    """Set to null a group left with options but no `_target_`: a null choice in a sweep that
    carries the options of the group's other choices (`pruner=null,magnitude pruner.pattern=2:4`)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        for g in GROUPS:
            node = cfg.get(g)
            if isinstance(node, DictConfig) and "_target_" not in node:
                log.info("%s=null: ignoring its options %s", g, ", ".join(map(str, node)))
                cfg[g] = None


def build_pipeline(cfg: DictConfig):
    """Pipeline(**groups) via hydra's instantiate; a null group is a skipped stage."""
    from hydra.utils import instantiate

    spec = {"_target_": "compresslab.pipeline.Pipeline", "seed": cfg.get("seed", 0)}
    for g in GROUPS:
        check_options(g, cfg.get(g))
        spec[g] = cfg.get(g)
    if cfg.get("engine") is not None:
        check_options("engine", cfg.engine)
        spec["engine"] = cfg.engine
    if cfg.get("save") is not None:
        spec["save"] = cfg.save
    return instantiate(OmegaConf.create(spec, flags={"allow_objects": True}), _convert_="all")


def config_hash(config: dict) -> str:
    """A short hash of the resolved job config; `force` and the logger do not change what a job computes."""
    import hashlib
    import json

    keep = {k: v for k, v in config.items() if k not in ("force", "logger")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def method_string(choices: dict) -> str:
    """'quarot+owl+sparsegpt+gptq+slim+beam' from Hydra's group choices; 'dense' when no stage runs."""
    parts = [choices.get(g) for g in STAGE_GROUPS]
    return "+".join(p for p in parts if p not in (None, "null")) or "dense"


def finished(path: Path, digest: str) -> bool:
    """True when `path` holds an ok metrics.json for the same config hash (the sweep skip rule)."""
    import json

    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("status") == "ok" and rec.get("config_hash") == digest


def run_from_config(cfg: DictConfig, output_dir: str | Path, choices: dict | None = None,
                    sweep: str | None = None) -> int:
    """Run one job; metrics.json is written in `output_dir` whatever happens. Returns an exit code.

    A job whose `output_dir` already holds an ok metrics.json for the same resolved config is
    skipped unless `force=true`, so re-running a sweep redoes only failed or unfinished jobs.
    `choices` (Hydra's group choices) names the method for W&B's job_type; `sweep` is its group."""
    from .metrics import environment, write_json_atomic

    output_dir = Path(output_dir)
    path = output_dir / "metrics.json"
    drop_null_group_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    for g in GROUPS:  # a skipped stage shows as null
        config.setdefault(g, None)
    digest = config_hash(config)
    choices = {g: (None if v == "null" else v) for g, v in (choices or {}).items()}  # conf/<group>/null.yaml
    meta = {"method": method_string(choices), "choices": {g: choices.get(g) for g in GROUPS}, "sweep": sweep,
            "config_hash": digest}
    if not cfg.get("force", False) and finished(path, digest):
        log.info("skipping: %s already holds an ok result for this config (force=true reruns it)", path)
        print(f"metrics: {path} (skipped, already done)", flush=True)
        return 0
    from .distributed import env_ranks

    main = (env_ranks() or (0,))[0] == 0 or cfg.get("engine", {}).get("distributed") == "off"
    pipeline = None
    try:
        pipeline = build_pipeline(cfg)
        main = pipeline.engine.ranks.is_main  # several ranks: joins the process group now
        if not main:  # the other ranks say nothing but errors
            logging.getLogger().setLevel(logging.ERROR)
            logging.getLogger("compresslab").setLevel(logging.ERROR)
            pipeline.engine.progress = False
        logger = pipeline.logger
        if logger is not None and hasattr(logger, "group"):
            logger.group = logger.group or sweep
            logger.job_type = logger.job_type or meta["method"]
        log.info("pipeline: model=%s stages=%s recovery=%s", pipeline.model_loader, pipeline.stages, pipeline.recovery)
        record = pipeline.run(output_dir, config, meta=meta)
        m = record["metrics"]
        shown = {k: round(v, 4) for k, v in m.items()
                 if k.startswith(("ppl/", "dense/ppl/", "sparsity", "avg_bits", "zeroshot/avg"))}
        log.info("results: %s", shown)
        code = 0
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then reported
        if pipeline is None and main:  # failed while instantiating: nothing else wrote metrics.json
            write_json_atomic(path, {"status": "failed", "error": f"{type(e).__name__}: {e}", **meta,
                                     "config": config, "metrics": {}, "traceback": traceback.format_exc(),
                                     "env": environment()})
        from .errors import ConfigError

        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            log.error("%s", cause)
        else:
            log.error("run failed:\n%s", traceback.format_exc())
        code = 1
    if main:
        print(f"metrics: {path}", flush=True)
    return code
