"""Budgeted per-layer levels by dynamic programming over measured layer errors.

A measuring pass of the engine (`LevelProbe`, which leaves every layer dense, so each layer sees the
dense model's inputs) compresses every Linear at every level with the pipeline's own stages, on a copy,
and records its relative output error through the Hessian, e = ‖(W − Ŵ)X‖² / ‖WX‖², and its cost
(kept weights for a sparsity budget; the packed bits, scales and zeros included, for avg_bits).
Assuming the errors add up (as OBC/SPDY's and the low-rank allocation papers' knapsacks do), the
choice min Σ e_l(k_l) s.t. Σ c_l(k_l) ≤ budget is solved exactly by dynamic programming over the
budget (in integer cost units; large budgets in `resolution` bins, the slack then spent greedily).
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..layer_error import hessian_rel_error
from ..metrics import layer_params, layer_storage_bits
from ..models.adapters import adapter_for
from ..pruner.base import DENSE
from ..pruner.masks import parse_pattern
from ..stages import STATE_ATTR, effective_weight, fuse_stages, layer_state, with_levels
from .base import Allocator, block_of, check_values, clear_states, holders, stage_value

MAX_EXACT_UNITS = 1 << 20  # integer budgets up to this many units are solved without binning


def solve(errors: np.ndarray, costs: np.ndarray, budget: float, resolution: int = 1 << 16) -> np.ndarray:
    """argmin over choices k (one per row) of Σ errors[l, k_l] s.t. Σ costs[l, k_l] ≤ budget.

    Exact when the costs are integers and the budget is at most MAX_EXACT_UNITS; otherwise the costs
    are rounded up to bins of budget/resolution (the choice stays within the budget) and the slack
    left is then spent on the upgrades with the best error drop per cost. Raises ConfigError when even
    the cheapest choice exceeds the budget."""
    errors, costs = np.asarray(errors, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    L, K = errors.shape
    if costs.min(1).sum() > budget + 1e-9:
        raise ConfigError(f"the budget {budget:.6g} is below the cheapest allocation ({costs.min(1).sum():.6g}): "
                          "add a cheaper level to allocation.levels or raise allocation.target")
    integral = np.all(costs == np.round(costs)) and budget <= MAX_EXACT_UNITS
    unit = 1.0 if integral else budget / resolution
    c = np.ceil(costs / unit - 1e-9).astype(np.int64)
    B = int(math.floor(budget / unit + 1e-9))
    best = np.full(B + 1, np.inf)
    best[0] = 0.0
    pick = np.zeros((L, B + 1), dtype=np.int16)
    for layer in range(L):
        new = np.full(B + 1, np.inf)
        for k in range(K):
            ck = c[layer, k]
            if ck > B:
                continue
            cand = best[:B + 1 - ck] + errors[layer, k]
            better = cand < new[ck:]
            new[ck:][better] = cand[better]
            pick[layer, ck:][better] = k
        best = new
    b = int(np.argmin(best))
    if not np.isfinite(best[b]):  # only the binning's rounding up can make a feasible problem fail here
        raise ConfigError("allocation: no choice fits the budget at this resolution; raise allocation.resolution")
    choice = np.zeros(L, dtype=np.int64)
    for layer in range(L - 1, -1, -1):
        k = int(pick[layer, b])
        choice[layer] = k
        b -= int(c[layer, k])
    if not integral:  # spend what the rounding up left
        slack = budget - costs[np.arange(L), choice].sum()
        while True:
            gain = errors[np.arange(L), choice][:, None] - errors
            extra = costs - costs[np.arange(L), choice][:, None]
            ok = (gain > 0) & (extra <= slack + 1e-9)
            if not ok.any():
                break
            ratio = np.where(ok, gain / np.maximum(extra, 1e-12), -np.inf)
            layer, k = np.unravel_index(np.argmax(ratio), ratio.shape)
            slack -= extra[layer, k]
            choice[layer] = k
    return choice


class LevelProbe:
    """A measuring stage: every Linear compressed at every level on a copy (the pipeline's stages with
    the level set), its relative squared output error through the Hessian and its cost recorded. The
    layer itself stays dense."""

    def __init__(self, stages, key: str, levels: list, cost: str, keep=None):
        self.stages = fuse_stages([s for s in stages if s is not None])
        self.key, self.levels, self.cost = key, list(levels), cost
        self.keep = keep  # a LevelCache (evopress.py) for each level's effective weight: EvoPress stitches from them
        self.needs = frozenset({"hessian"}).union(*(s.needs for s in self.stages))
        self.uses_original = True
        self.table: dict[str, tuple[list[float], list[float]]] = {}

    def check(self, name, layer):
        for lv in self.levels:
            for s in self.stages:
                with_levels(s, {self.key: lv}).check(name, layer)

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats) -> None:
        W = layer.weight.detach().float()
        H = stats.hessian
        errs, costs = [], []
        # the leading stages that do not hold the level (e.g. the pruner and quantizer under an adapter
        # rank budget) run once; the copy they leave goes through the rest at each level
        first = next((i for i, s in enumerate(self.stages) if holders([s], self.key)), len(self.stages))
        base = _fresh_linear(layer)
        layer_state(base, create=True).original = W
        for s in self.stages[:first]:
            s.compress(name, base, stats)
        for lv in self.levels:
            tmp = _copy_linear(base, W)
            for s in self.stages[first:]:
                with_levels(s, {self.key: lv}).compress(name, tmp, stats)
            W_hat = effective_weight(tmp)
            errs.append(hessian_rel_error(W, W_hat, H) ** 2)
            if self.keep is not None:
                self.keep.put(name, len(errs) - 1, W_hat)
            if self.cost == "kept":
                keep = layer_state(tmp).keep_mask()
                costs.append(float(keep.sum()) if keep is not None else float(W.numel()))
            elif self.cost == "params":  # the weight (unless the factors replace it) and the adapters
                costs.append(float(layer_params(tmp)))
            else:
                costs.append(float(layer_storage_bits(tmp)))
        self.table[name] = (errs, costs)


class DP(Allocator):
    """Args:
        budget: sparsity (the mean over all block Linears' weights) | avg_bits (packed bits per weight) |
            params (stored parameters per weight, low-rank adapters included: the adapters' ranks).
            With an N:M pruner, a sparsity budget chooses each layer's pattern: N:M or dense.
        target: its value (null: the uniform setting's, i.e. the stages' own sparsity / bits).
        levels: the choices (sparsities, patterns such as ['dense', '2:4'], or bit widths); null: around
            the stage's own value (patterns: dense and the pruner's own).
        granularity: layer (each Linear its level) | block (one level per block).
        resolution: budget bins when the budget is too large to solve in integer units.
        path: a saved allocation.yaml to reuse.
    """

    takes_patterns = True

    def __init__(self, budget: str = "sparsity", target: float | None = None, levels: list | None = None,
                 granularity: str = "layer", resolution: int = 1 << 16, path: str | None = None):
        super().__init__(budget, target, path)
        if granularity not in ("layer", "block"):
            raise ConfigError(f"allocation.granularity={granularity!r}: use layer or block")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise ConfigError(f"allocation.resolution={resolution!r} must be an int >= 16")
        if levels is not None:
            levels = list(levels)
            if not levels or len(levels) > 64:
                raise ConfigError("allocation.levels must list 1 to 64 choices, or be null")
            _check_level_values(self.key, levels)
        self.levels_, self.granularity, self.resolution = levels, granularity, resolution

    def check_levels(self, stages) -> None:
        own = stage_value(stages, self.key)
        patterns = self.levels_ is not None and all(isinstance(v, str) for v in self.levels_)
        if self.levels_ is not None and patterns != (self.key == "pattern"):
            raise ConfigError(
                f"allocation.levels={self.levels_} with pruner.pattern={own}: an N:M pruner takes a pattern per layer, "
                "e.g. allocation.levels=[dense,2:4]" if self.key == "pattern" else
                f"allocation.levels={self.levels_} are patterns, which an N:M pruner takes (e.g. pruner.pattern=2:4); "
                "an unstructured pruner takes sparsities, e.g. allocation.levels=[0.5,0.6,0.7]")
        levels = self._levels(own)
        check_values(stages, self.key, levels)
        if self.target is not None:  # an impossible budget fails now, not after the measuring pass
            if self.key == "pattern" and self.target > max(map(_pattern_sparsity, levels)) + 1e-9:
                raise ConfigError(f"allocation.target={self.target} is above the sparsest pattern's "
                                  f"{max(map(_pattern_sparsity, levels)):g}: add sparser patterns to allocation.levels")
            if self.key == "sparsity" and self.target > max(levels):
                raise ConfigError(f"allocation.target={self.target} is above the largest level {max(levels)}: add "
                                  "higher sparsities to allocation.levels")
            if self.key == "bits" and self.target < min(v for v in levels if v is not None):
                raise ConfigError(f"allocation.target={self.target} bits is below the smallest level: add lower bit "
                                  "widths to allocation.levels")

    def _levels(self, own):
        if self.key == "rank" and own is None:  # the stage's rank_ratio: its own per-layer rank is the level None
            if self.levels_ is None:
                raise ConfigError("allocation.budget=params with a lowrank stage set by rank_ratio: list the ranks to "
                                  "choose from, allocation.levels=[8,16,32,64]")
            return sorted(set(self.levels_)) + [None]
        if self.key == "pattern":  # N:M vs dense per layer, in order of sparsity
            return sorted(set(self.levels_ or [DENSE]) | {own}, key=lambda v: (_pattern_sparsity(v), str(v)))
        if self.levels_ is not None:
            return sorted(set(self.levels_) | {own})
        if self.key == "rank":
            return sorted({max(1, own // 2), own, own * 2})
        if self.key == "sparsity":
            return sorted({round(min(max(own + d, 0.0), 0.95), 4) for d in (-0.2, -0.1, 0.1, 0.2)} | {own})
        return sorted({b for b in (own - 1, own + 1) if 2 <= b <= 8} | {own})

    def measure(self, model, calibration, stages, engine, keep=None):
        """The measuring pass: (names, levels, errors (L, K), costs (L, K), budget, target, index of the
        stage's own level, the probe). `keep`: a LevelCache to hold every level's weight."""
        own = stage_value(stages, self.key)
        levels = self._levels(own)
        probe = LevelProbe(stages, self.key, levels, {"sparsity": "kept", "avg_bits": "bits", "params": "params"}[
                           self.budget], keep)
        engine.levels = {}  # the measuring pass runs every stage at each level itself
        engine.run(model, calibration, [probe])
        clear_states(model)
        names = [n for n, _ in adapter_for(model).named_linears(model)]
        total = sum(lin.weight.numel() for _, lin in adapter_for(model).named_linears(model))
        errs = np.array([probe.table[n][0] for n in names])
        costs = np.array([probe.table[n][1] for n in names])
        k_own = levels.index(own)
        if self.budget == "sparsity" and self.target is not None:
            target, budget = self.target, (1 - self.target) * total  # kept weights
        elif self.budget == "sparsity":  # the uniform setting's kept weights (its per-row rounding included)
            budget = costs[:, k_own].sum()
            target = 1 - budget / total
        else:  # packed bits, or stored parameters, per weight
            target = self.target if self.target is not None else costs[:, k_own].sum() / total
            budget = target * total
        return names, levels, errs, costs, budget, target, k_own, probe

    def choose(self, model, names, errs, costs, budget) -> np.ndarray:
        """The DP's choice per Linear (per block with granularity=block, each block's Linears summed)."""
        if self.granularity == "layer":
            return solve(errs, costs, budget, self.resolution)
        adapter = adapter_for(model)
        block = np.array([block_of(adapter, n) for n in names])
        ids = sorted(set(block.tolist()))
        per = solve(np.array([errs[block == i].sum(0) for i in ids]), np.array([costs[block == i].sum(0) for i in ids]),
                    budget, self.resolution)
        return np.array([per[ids.index(b)] for b in block])

    def record(self, model, names, levels, errs, costs, choice, target, k_own) -> dict[str, dict]:
        total = sum(lin.weight.numel() for _, lin in adapter_for(model).named_linears(model))
        spent = costs[np.arange(len(names)), choice].sum()
        met = 1 - spent / total if self.budget == "sparsity" else spent / total
        self.report = {"allocation/target": float(target), "allocation/met": float(met),
                       "allocation/error_sum": float(errs[np.arange(len(names)), choice].sum()),
                       "allocation/error_sum_uniform": float(errs[:, k_own].sum())}
        return {n: {self.key: _plain(levels[k])} for n, k in zip(names, choice)}

    def allocate(self, model, calibration, stages, engine) -> dict[str, dict]:
        names, levels, errs, costs, budget, target, k_own, _ = self.measure(model, calibration, stages, engine)
        choice = self.choose(model, names, errs, costs, budget)
        return self.record(model, names, levels, errs, costs, choice, target, k_own)


def _fresh_linear(layer: nn.Linear) -> nn.Linear:
    """A new Linear with `layer`'s weight and bias, and no stage record."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    out.weight.data.copy_(layer.weight.data)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data)
    return out


def _copy_linear(layer: nn.Linear, original: torch.Tensor) -> nn.Linear:
    """`layer` with its stage record deep-copied (the dense `original` shared: read only)."""
    out = _fresh_linear(layer)
    out.__dict__[STATE_ATTR] = copy.deepcopy(layer_state(layer), {id(original): original})
    return out


def _check_level_values(key: str, levels: list) -> None:
    """Sparsities in [0, 1) or patterns ('dense', 'N:M'; for an N:M pruner), bit widths 2..8, ranks >= 1."""
    if key == "sparsity" and any(isinstance(v, str) for v in levels):  # patterns: N:M vs dense per layer
        for v in levels:
            m = re.fullmatch(r"(\d+):(\d+)", v) if isinstance(v, str) else None
            if v != DENSE and not (m and 0 < int(m.group(1)) < int(m.group(2))):
                raise ConfigError(f"allocation.levels has {v!r}: list sparsities (an unstructured pruner) or patterns, "
                                  "'dense' or 'N:M' with 0 < N < M (an N:M pruner), not both")
        return
    ok = {"sparsity": lambda v: 0 <= v < 1, "bits": lambda v: isinstance(v, int) and 2 <= v <= 8,
          "rank": lambda v: isinstance(v, int) and v >= 1}[key]
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"allocation.levels has {v!r}: sparsities must be in [0, 1), patterns 'dense' or "
                              "'N:M', bit widths ints in 2..8, ranks ints >= 1")


def _pattern_sparsity(pattern: str) -> float:
    """'dense' -> 0; 'N:M' -> 1 - N/M."""
    nm = None if pattern == DENSE else parse_pattern(pattern)
    return 0.0 if nm is None else 1 - nm[0] / nm[1]


def _plain(v):
    if v is None or isinstance(v, str):
        return v
    return int(v) if isinstance(v, (int, np.integer)) else float(v)
