"""EvoPress (Sieberling et al. 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search"): per-layer levels by a level-switching evolutionary search on the whole model.

The measuring pass (as `dp`, with the dense inputs) also keeps each Linear's effective weight at every
level (`LevelCache`: fp16 for an fp32 model, else the model's dtype, levels x the block Linears' size; in
CPU memory, or in files under a temporary directory, memory-mapped, when that would not fit in half the
free host memory). A candidate rewrites only the Linears whose level differs from the one installed.
The model runs where it is (the whole model at once); the dense log-probabilities are kept in bf16. A candidate is one level per Linear; its
fitness is the KL divergence of the stitched model's next-token distribution from the dense model's,
on the first `windows` calibration windows (a forward per candidate, no compression). The search is
(1 + λ): from the parent (the DP's choice, which meets the budget), `offspring` children each switch
1..`max_switches` pairs of Linears of the same shape, one a level up and one a level down (same-shape
Linears cost the same at a level, so with evenly spaced level costs the total stays the same; a child
over the budget is drawn again); the best child replaces the parent when its fitness is lower. The paper selects in several stages on growing token counts; here one
stage, every child on all the windows. Activation quantization is not applied while searching.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.adapters import adapter_for
from ..plan import free_memory, human
from .base import stage_value
from .dp import DP

log = logging.getLogger(__name__)

CACHES = ("auto", "memory", "disk")


class LevelCache:
    """Every Linear's effective weight at every level, for stitching candidates: in CPU memory, or one
    file per (Linear, level) in `directory`, read back memory-mapped (the OS pages them in and out)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.mem: dict[tuple[str, int], torch.Tensor] = {}

    @staticmethod
    def dtype(like: torch.dtype) -> torch.dtype:
        """fp16 for an fp32 model (the fitness only needs a forward), else the model's own dtype."""
        return torch.float16 if like == torch.float32 else like

    def put(self, name: str, k: int, W: torch.Tensor) -> None:
        W = W.detach().to("cpu", self.dtype(W.dtype))
        if self.directory is None:
            self.mem[name, k] = W
        else:
            torch.save(W.contiguous(), self.directory / f"{name}.{k}.pt")

    def get(self, name: str, k: int) -> torch.Tensor:
        if self.directory is None:
            return self.mem[name, k]
        return torch.load(self.directory / f"{name}.{k}.pt", mmap=True, weights_only=True)


def level_switch(choice: np.ndarray, classes: list[np.ndarray], K: int, switches: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A child: `switches` times, in a random class of interchangeable Linears, one Linear a level up and
    another a level down (skipped when no pair can move)."""
    child = choice.copy()
    movable = [c for c in classes if len(c) > 1]
    for _ in range(switches):
        if not movable:
            break
        cls = movable[rng.integers(len(movable))]
        up = cls[child[cls] < K - 1]
        down = cls[child[cls] > 0]
        if len(up) == 0 or len(down) == 0:
            continue
        a = up[rng.integers(len(up))]
        b_choices = down[down != a]
        if len(b_choices) == 0:
            continue
        b = b_choices[rng.integers(len(b_choices))]
        child[a] += 1
        child[b] -= 1
    return child


class EvoPress(DP):
    """Args (besides dp's budget, target, levels, resolution, path):
        generations: search steps (paper: hundreds; scale to CPU time).
        offspring: children per generation.
        max_switches: level switches per child, drawn from 1..max_switches.
        windows: calibration windows the fitness is measured on.
        seed: the search's random numbers.
    """

    def __init__(self, budget: str = "sparsity", target: float | None = None, levels: list | None = None,
                 generations: int = 50, offspring: int = 8, max_switches: int = 3, windows: int = 4,
                 seed: int = 0, cache: str = "auto", resolution: int = 1 << 16, path: str | None = None):
        super().__init__(budget, target, levels, "layer", resolution, path)
        for key, v, lo in (("generations", generations, 0), ("offspring", offspring, 1),
                           ("max_switches", max_switches, 1), ("windows", windows, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"allocation.{key}={v!r} must be an int >= {lo}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"allocation.seed={seed!r} must be an int")
        if cache not in CACHES:
            raise ConfigError(f"allocation.cache={cache!r}: use auto (memory when every level's weights fit in half "
                              "the free host memory, else disk), memory or disk")
        self.generations, self.offspring, self.max_switches = generations, offspring, max_switches
        self.windows, self.seed, self.cache = windows, seed, cache
        self.curve: list[float] = []

    def allocate(self, model, calibration, stages, engine) -> dict[str, dict]:
        linears = dict(adapter_for(model).named_linears(model))
        directory = self._cache_dir(linears.values(), len(self._levels(stage_value(stages, self.key))))
        try:
            return self._search(model, calibration, stages, engine, linears, LevelCache(directory))
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _cache_dir(self, linears, n_levels: int) -> Path | None:
        """Where the levels' weights go: None (memory) or a new temporary directory (disk; TMPDIR chooses
        the file system)."""
        need = sum(lin.weight.numel() * LevelCache.dtype(lin.weight.dtype).itemsize for lin in linears) * n_levels
        free = free_memory(torch.device("cpu"))
        disk = self.cache == "disk" or self.cache == "auto" and free is not None and need > free // 2
        if not disk:
            return None
        d = Path(tempfile.mkdtemp(prefix="compresslab-evopress-"))
        log.info("evopress: the %d levels' weights (%s) go to %s (free host memory %s)", n_levels, human(need), d,
                 human(free) if free is not None else "unknown")
        return d

    def _search(self, model, calibration, stages, engine, linears, cache: LevelCache) -> dict[str, dict]:
        names, levels, errs, costs, budget, target, k_own, _ = self.measure(model, calibration, stages, engine,
                                                                            keep=cache)
        choice = self.choose(model, names, errs, costs, budget)
        shapes: dict[tuple, list[int]] = {}
        for i, n in enumerate(names):  # interchangeable: same shape and the same cost at every level
            shapes.setdefault((tuple(linears[n].weight.shape), tuple(costs[i])), []).append(i)
        classes = [np.array(v) for v in shapes.values()]
        ids = calibration[: self.windows]
        dense = {n: linears[n].weight.detach().to("cpu", copy=True) for n in names}
        rng = np.random.default_rng(self.seed)
        self._installed = None  # the level each Linear holds now (None: the dense weights)
        try:
            ref = self._logprobs(model, ids, engine)
            parent, best = choice, self._fitness(model, names, linears, cache, choice, ids, ref)
            self.curve = [best]
            done = 0
            for _ in tqdm(range(self.generations), desc="evopress", disable=not engine.progress):
                children = []
                for _ in range(self.offspring * 20):  # level costs need not be evenly spaced: keep the feasible
                    c = level_switch(parent, classes, len(levels), int(rng.integers(1, self.max_switches + 1)), rng)
                    if costs[np.arange(len(names)), c].sum() <= budget and not np.array_equal(c, parent):
                        children.append(c)
                    if len(children) == self.offspring:
                        break
                if not children:
                    break
                scored = [(self._fitness(model, names, linears, cache, c, ids, ref), k)
                          for k, c in enumerate(children)]
                fit, k = min(scored)
                if fit < best:
                    parent, best = children[k], fit
                self.curve.append(best)
                done += 1
        finally:
            with torch.no_grad():
                for n in names:  # the compression pass starts from the dense weights
                    linears[n].weight.copy_(dense[n])
        out = self.record(model, names, levels, errs, costs, parent, target, k_own)
        self.report.update({"allocation/kl_start": self.curve[0], "allocation/kl": best,
                            "allocation/generations": float(done)})
        return out

    @torch.no_grad()
    def _logprobs(self, model, ids, engine) -> list[torch.Tensor]:
        """Per window, the next-token log-probabilities in bf16 (a (T, vocab) tensor each)."""
        dev = next(model.parameters()).device
        return [torch.log_softmax(model(w[None].to(dev), use_cache=False).logits[0].float(), -1).bfloat16()
                for w in ids]

    @torch.no_grad()
    def _fitness(self, model, names, linears, cache, choice, ids, ref) -> float:
        """Mean over tokens of KL(dense ‖ stitched), window by window."""
        for i, (n, k) in enumerate(zip(names, choice)):
            if self._installed is None or self._installed[i] != k:  # only the Linears whose level changed
                w = linears[n].weight
                w.copy_(cache.get(n, int(k)).to(w.device, w.dtype))
        self._installed = np.array(choice, copy=True)
        dev = next(model.parameters()).device
        total = 0.0
        for w_ids, logp in zip(ids, ref):
            logq = torch.log_softmax(model(w_ids[None].to(dev), use_cache=False).logits[0].float(), -1)
            logp = logp.float()
            total += float((logp.exp() * (logp - logq)).sum(-1).mean())
        return total / len(ref)
