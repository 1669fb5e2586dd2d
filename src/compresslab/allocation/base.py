"""Per-layer levels under one budget (the `allocation` group): what every allocator shares.

An allocator measures (one pass of the ordinary engine loop with a `Probe`-like stage that leaves
every layer dense), turns the budget into per-Linear levels ({full Linear name: {option: value}}),
and the compression pass is the ordinary loop: the engine runs each stage with its layer's levels
(`with_levels`). The levels are written as `allocation.yaml` beside metrics.json and can be reused
with `allocation.path=<that file>`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..stages import STATE_ATTR, LayerState, is_stage

BUDGETS = {"sparsity": "sparsity", "avg_bits": "bits", "params": "rank"}  # what is budgeted -> the option it sets
FILE = "allocation.yaml"


def holders(stages, key: str) -> list:
    """Every stage, nested ones included (a fused pass's pruner and quantizer), that has the option `key`."""
    out = []
    for s in stages:
        if s is None:
            continue
        if key in vars(s):
            out.append(s)
        out += holders([v for v in vars(s).values() if is_stage(v)], key)
    return out


def check_values(stages, key: str, values) -> None:
    """Each value must be one every holder of `key` takes (its `check_level`, the range its __init__ enforces)."""
    for s in holders(stages, key):
        if hasattr(s, "check_level"):
            for v in values:
                s.check_level(key, v)


def stage_value(stages, key: str):
    """The first stage's (or nested stage's) option `key`."""
    found = holders(stages, key)
    if not found:
        raise ConfigError(f"no stage has `{key}`")
    return getattr(found[0], key)


def block_of(adapter, name: str) -> int:
    """The block index in a full Linear name, '<adapter.blocks>.<i>.<...>'."""
    return int(name[len(adapter.blocks) + 1:].split(".", 1)[0])


def save_levels(path: Path, levels: dict[str, dict], meta: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump({"allocation": meta, "levels": levels}, sort_keys=False))
    tmp.replace(path)


def load_levels(path: str | Path) -> tuple[dict[str, dict], dict]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"allocation.path={path!r} is not a file; pass the {FILE} an earlier run wrote beside "
                          "its metrics.json, or leave it null to allocate")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"allocation.path={path}: not valid YAML ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("levels"), dict):
        raise ConfigError(f"allocation.path={path} has no 'levels' mapping: not an {FILE} compresslab wrote")
    return doc["levels"], doc.get("allocation") or {}


class Allocator:
    """Base of `allocation=...`. Subclasses implement `allocate(model, calibration, stages, engine)`
    -> {Linear name: {option: value}}; `path` reuses a saved allocation instead."""

    def __init__(self, budget: str = "sparsity", target: float | None = None, path: str | None = None):
        if budget not in BUDGETS:
            raise ConfigError(f"allocation.budget={budget!r}: use one of {', '.join(BUDGETS)}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
            raise ConfigError(f"allocation.target={target!r} must be a number or null (the uniform setting's)")
        if budget == "sparsity" and target is not None and not 0 <= target < 1:
            raise ConfigError(f"allocation.target={target} is a sparsity: use a value in [0, 1)")
        if budget == "avg_bits" and target is not None and not 1 <= target <= 16:
            raise ConfigError(f"allocation.target={target} is an average number of bits: use a value in [1, 16]")
        if budget == "params" and target is not None and not target > 0:
            raise ConfigError(f"allocation.target={target} is stored parameters per weight (adapters included): "
                              "use a value > 0")
        if path is not None:
            load_levels(path)  # a missing or unreadable file fails now
        self.budget, self.target, self.path = budget, target, path
        self.report: dict = {}
        self._key = BUDGETS[budget]

    takes_patterns = False  # a sparsity budget over an N:M pruner: each layer N:M or dense (set in `check`)

    @property
    def key(self) -> str:
        """The stage option each layer's level sets: sparsity, pattern (N:M vs dense), bits or rank."""
        return self._key

    @property
    def needs_calibration(self) -> bool:
        return self.path is None

    def check(self, stages) -> None:
        """Before loading: some stage must take the budgeted option."""
        self._key = BUDGETS[self.budget]
        if not holders(stages, self.key):
            kind = {"sparsity": "pruner", "bits": "quantizer", "rank": "lowrank stage"}[self.key]
            raise ConfigError(f"allocation.budget={self.budget} sets each layer's `{self.key}`, which none of the "
                              f"stages has: add a {kind}")
        for s in stages:
            if hasattr(s, "finish_block") and holders([s], self.key):
                raise ConfigError(f"{type(s).__name__} trains each block with one `{self.key}` for all its layers, "
                                  f"so per-layer levels of it cannot be allocated; use its one-shot variant")
        nm = any(getattr(s, "nm", None) is not None for s in holders(stages, "nm"))
        if self.budget == "sparsity" and nm:
            if not self.takes_patterns:
                raise ConfigError(f"allocation={type(self).__name__.lower()} gives per-layer sparsities, which needs "
                                  "an unstructured pruner (pruner.pattern=unstructured); for N:M vs dense per layer "
                                  "use allocation=dp or evopress")
            self._key = "pattern"
        self.check_levels(stages)

    def check_levels(self, stages) -> None:
        """The levels this allocator may give, checked against the stages (before loading)."""
        return None

    def allocate(self, model: nn.Module, calibration: torch.Tensor, stages, engine) -> dict[str, dict]:
        raise NotImplementedError

    def levels(self, model, calibration, stages, engine, output_dir=None) -> dict[str, dict]:
        """The per-Linear levels: loaded from `path`, or allocated (and saved in `output_dir`)."""
        if self.path is not None:
            levels, meta = load_levels(self.path)
            names = {n for n, _ in _linears(model)}
            unknown = sorted(set(levels) - names)
            if unknown:
                raise ConfigError(f"allocation.path={self.path} names layers this model lacks ({unknown[:3]}): it "
                                  "was allocated for another model")
            keys = {k for v in levels.values() for k in (v or {})}
            if keys - {self.key}:
                raise ConfigError(f"allocation.path={self.path} sets {sorted(keys)}, but allocation.budget={self.budget} "
                                  f"allocates `{self.key}`: set the budget the file was made with")
            check_values(stages, self.key, {v[self.key] for v in levels.values() if v})
            self.report = {"allocation/reused": 1.0}
            return levels
        levels = self.allocate(model, calibration, stages, engine)
        if output_dir is not None:
            save_levels(Path(output_dir) / FILE, levels,
                        {"method": type(self).__name__.lower(), "budget": self.budget, **self.summary()})
        return levels

    def summary(self) -> dict:
        """The allocation's own figures (target, what it met), for metrics and the saved file."""
        return {k.split("/", 1)[1]: v for k, v in self.report.items() if k.startswith("allocation/")}


def stage_default(stages):
    """The allocation a stage brings when none is given (`default_allocation()`, e.g. SVD-LLM V2's
    heterogeneous ranks), or None."""
    return next((a for s in stages if s is not None and hasattr(s, "default_allocation")
                 for a in [s.default_allocation()] if a is not None), None)


def _linears(model: nn.Module):
    from ..models.adapters import adapter_for

    return adapter_for(model).named_linears(model)


def clear_states(model: nn.Module) -> None:
    """Drop what a measuring pass left on the Linears (the engine records errors on them); a rotation's
    online transform stays."""
    for _, lin in _linears(model):
        state = lin.__dict__.pop(STATE_ATTR, None)
        if state is not None and state.online is not None:
            lin.__dict__[STATE_ATTR] = LayerState(online=state.online)
