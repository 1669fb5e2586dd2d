"""Every file in conf/ composes and instantiates; bad options fail with Hydra's list."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig

from compresslab.cli import GROUPS, build_pipeline, check_options

CONF = Path(__file__).resolve().parents[1] / "conf"
ROOT = CONF.parent

OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))] if CONF.is_dir() else []
EXTRA = {("model", "hf"): ["model.name_or_path=some/model"]}
NO_SCALAR_ATTRS = {("eval", "full")}  # two evaluators


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_every_group_has_options():
    groups_with_files = {g for g, _ in OPTIONS}
    assert {"model", "data", "pruner", "quantizer", "eval", "logger"} <= groups_with_files


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_instantiates(group, option, tmp_path):
    """Each conf/<group>/<option>.yaml builds exactly its `_target_` class, every key of the file is
    an argument of that class (check_options), and the values reach the object unchanged wherever it
    keeps them under the same name."""
    extra = list(EXTRA.get((group, option), []))
    if (group, option) == ("pruner", "mask"):  # needs a real file of masks
        from safetensors.torch import save_file

        save_file({"m": torch.ones(2, 4, dtype=torch.uint8)}, str(tmp_path / "m.safetensors"))
        extra.append(f"pruner.path={tmp_path / 'm.safetensors'}")
    cfg = _compose([f"{group}='{option}'", *extra])
    if option == "null":  # conf/<group>/null.yaml: the stage is skipped
        assert cfg[group] is None
        return
    check_options(group, cfg[group])
    obj = instantiate(cfg[group])
    assert type(obj) is get_class(cfg[group]._target_)
    kept = 0
    for key, value in cfg[group].items():
        if key.startswith("_") or not hasattr(obj, key) or isinstance(value, DictConfig) or value is None:
            continue  # (null means "derive it": static_groups, sparsity from the pattern, ...)
        got = getattr(obj, key)
        if isinstance(value, ListConfig):
            value, got = list(value), list(got)
        if isinstance(got, (str, int, float, bool, list, type(None))):
            assert got == value, (key, got, value)
            kept += 1
    options = [k for k in cfg[group] if not k.startswith("_")]
    assert kept or not options or (group, option) in NO_SCALAR_ATTRS, f"{group}={option}: no option reached the object"


def test_defaults_build_a_pipeline_with_skipped_stages():
    cfg = _compose([])
    assert all(cfg.get(g) is None for g in ("pruner", "quantizer", "lowrank", "recovery"))
    p = build_pipeline(cfg)
    assert p.stages == [] and p.recovery is None
    assert p.model_loader.name == "smollm2_135m"


def test_stage_options_reach_the_objects():
    cfg = _compose(["pruner=magnitude", "pruner.pattern=2:4", "quantizer=rtn", "quantizer.bits=3",
                    "quantizer.group_size=64", "model=tiny_llama"])
    p = build_pipeline(cfg)
    assert p.pruner.nm == (2, 4) and p.quantizer.bits == 3 and p.quantizer.group_size == 64


def test_bad_option_lists_valid_ones():
    with pytest.raises(MissingConfigException, match="magnitude"):
        _compose(["pruner=no_such_pruner"])


def test_cli_bad_option_and_help():
    out = subprocess.run([sys.executable, "run.py", "pruner=no_such_pruner"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "no_such_pruner" in out.stderr and "magnitude" in out.stderr
    help_ = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0
    for line in ("pruner: jsq, magnitude, mask, null, sparsegpt, wanda",
                 "quantizer: absmax, awq, gptq, null, rtn, slim_llm, slim_llm_plus, slim_quant, spqr, squeezellm",
                 "lowrank: asvd, eora, fwsvd, l2qer, naive, null, slim, svd_llm, svd_llm_v2", "recovery: beam, finetune, null", "eval: full, null, ppl, zeroshot", "logger: none, wandb", "data: calibration"):
        assert line in help_.stdout, line


def test_cli_eval_null_skips_the_evaluation(tmp_path):
    """`eval=null` (the README's "null skips a stage", for the one group whose default is not null):
    the run compresses and writes metrics.json with the compression's figures and no evaluation."""
    out = subprocess.run([sys.executable, "run.py", "model=tiny_llama", "quantizer=rtn", "quantizer.group_size=32",
                          "eval=null", "logger=none", "engine.progress=false", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["avg_bits"] > 4
    assert not any(k.startswith(("ppl/", "dense/", "acc")) for k in rec["metrics"])
