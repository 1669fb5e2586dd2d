"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity"): blocks with more outliers keep more weights.

Per block l, on the dense model (a measuring pass of the engine that prunes nothing), the outlier
ratio D_l = the fraction of the Wanda scores |W_ij|·‖X_j‖₂ of all the block's Linears that exceed M times
their mean. Then D is mapped linearly onto [0, 2λ], shifted to mean 1 − S (S the target sparsity):
the block's density; its sparsity S_l = 1 − density_l, mean S (blocks are equal), spread 2λ: within
[S − 2λ, S + 2λ] (±λ when the ratios are spread evenly). The paper: M = 5, λ = 0.08 for LLaMA at 70%.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import adapter_for
from .base import Allocator, block_of, check_values, clear_states, stage_value


class OutlierCounter:
    """A measuring stage: per block, how many Wanda scores exceed M x the block's mean. Leaves layers dense.
    A block's scores are kept (fp32, on the CPU: 4 bytes a weight of one block) until its last Linear, then counted."""

    needs = frozenset({"act_norm"})

    def __init__(self, block_of, M: float):
        self.block_of, self.M = block_of, M
        self.ratios: dict[int, float] = {}
        self._block, self._scores = None, []

    def check(self, name, layer):
        pass

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats) -> None:
        b = self.block_of(name)
        if b != self._block:
            self.finish()
            self._block = b
        self._scores.append((layer.weight.detach().float().abs() * stats.act_norm[None, :].float()).flatten().cpu())

    def finish(self) -> None:
        if self._block is not None and self._scores:
            s = torch.cat(self._scores).float()
            self.ratios[self._block] = float((s > self.M * s.mean()).float().mean())
        self._block, self._scores = None, []


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: D scaled to [0, 2λ], density = that − mean + 1 − S."""
    D = torch.tensor(ratios, dtype=torch.float64)
    span = D.max() - D.min()
    scaled = (D - D.min()) / span * 2 * lam if span > 0 else torch.zeros_like(D)
    density = scaled - scaled.mean() + (1 - target)
    return (1 - density).tolist()


class OWL(Allocator):
    """Args:
        M: outlier threshold, in multiples of the block's mean score (paper: 5).
        lam: the sparsity spread: max − min block sparsity = 2λ, every block within S ± 2λ (paper: 0.08).
        target: the mean sparsity (null: the pruner's `sparsity`).
        path: a saved allocation.yaml to reuse.
    """

    def __init__(self, M: float = 5.0, lam: float = 0.08, target: float | None = None, path: str | None = None):
        super().__init__("sparsity", target, path)
        if isinstance(M, bool) or not isinstance(M, (int, float)) or M <= 0:
            raise ConfigError(f"allocation.M={M!r} must be a number > 0 (outliers: scores above M x the mean)")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < 0.5:
            raise ConfigError(f"allocation.lam={lam!r} must be in [0, 0.5): each block's sparsity stays within ±lam")
        self.M, self.lam = float(M), float(lam)

    def check_levels(self, stages) -> None:
        target = self.target if self.target is not None else stage_value(stages, "sparsity")
        if target - 2 * self.lam < 0 or target + 2 * self.lam >= 1:
            raise ConfigError(f"OWL can give block sparsities anywhere in target ± 2·lam = [{target - 2 * self.lam:.3f}, "
                              f"{target + 2 * self.lam:.3f}], outside [0, 1): lower allocation.lam")
        check_values(stages, "sparsity", [max(target - 2 * self.lam, 0.0), min(target + 2 * self.lam, 0.999)])

    def allocate(self, model, calibration, stages, engine) -> dict[str, dict]:
        adapter = adapter_for(model)
        target = self.target if self.target is not None else stage_value(stages, "sparsity")
        counter = OutlierCounter(lambda name: block_of(adapter, name), self.M)
        engine.levels = {}
        engine.run(model, calibration, [counter])
        counter.finish()
        clear_states(model)
        n = len(adapter.block_list(model))
        ratios = [counter.ratios[i] for i in range(n)]
        sparsity = owl_sparsities(ratios, target, self.lam)
        if min(sparsity) < 0 or max(sparsity) >= 1:
            raise ConfigError(f"OWL gives block sparsities in [{min(sparsity):.3f}, {max(sparsity):.3f}] at target "
                              f"{target} with lam={self.lam}: lower allocation.lam")
        self.report = {"allocation/target": target, "allocation/min": min(sparsity), "allocation/max": max(sparsity)}
        self.ratios = ratios
        return {name: {"sparsity": sparsity[block_of(adapter, name)]}
                for name, _ in adapter.named_linears(model)}

