"""SVD-LLM V2's heterogeneous compression ratios (Wang et al., NAACL 2025, §3.1), as an allocator.

A measuring pass (the ordinary engine loop with a probe that leaves every layer dense) takes each
matrix's whitened spectrum: the singular values σ of W·Q√Λ, XXᵀ = QΛQᵀ summed over the calibration
tokens. The theoretical truncation loss of the matrix at the uniform rank r_u (the one `param_ratio`
gives its shape) is L = √(Σ_{k ≥ r_u} σ_k²). Within each group of matrices of one type (q_proj of every
block, ...), as we read the paper's rule, the removed fraction of matrix i is

    R_i = |G| · R · (1 / log L_i) / Σ_j (1 / log L_j),        R = 1 − param_ratio,

so a matrix that loses more when truncated keeps more (the ratios average to R, the group's budget).
Ranks are r_i = ⌊(1 − R_i)·out·in / (out + in)⌋ within [1, min(out, in)]; if clamping leaves the total
above what uniform ranks spend, singular values are dropped where they cost least (σ² per parameter).
A group whose smallest loss is ≤ 1 (log ≤ 0; only with very few calibration tokens) keeps uniform ranks.

`rule=loss` (not the paper's) instead minimises the summed theoretical loss Σ_i Σ_{k ≥ r_i} σ_ik² under the
same parameter total directly: singular values are kept greedily by σ² per parameter (out + in) across all
matrices; each matrix's σ² do not increase with k, so this is optimal whenever the budget is spent exactly
(always among matrices of one shape), and within one rank's cost otherwise.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError
from ..lowrank.base import resolve_rank
from ..lowrank.eora import eigen_whitening
from ..models.adapters import adapter_for
from .base import Allocator, clear_states, holders

log = logging.getLogger(__name__)


class SpectrumProbe:
    """A measuring stage: each Linear's whitened squared singular values, its layer left dense."""

    needs = frozenset({"hessian"})

    def __init__(self):
        self.spectra: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}

    def check(self, name, layer):
        pass

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats) -> None:
        W = layer.weight.detach().float()
        T, _ = eigen_whitening(stats.hessian * (stats.n / 2))  # XXᵀ summed over the tokens (H = 2/n·XXᵀ)
        sigma = torch.linalg.svdvals((W @ T).double())
        self.spectra[name] = (sigma.square().cpu(), tuple(W.shape))


RULES = ("paper", "loss")


def loss_optimal_ranks(spectra: dict[str, tuple[torch.Tensor, tuple[int, int]]], budget: float) -> dict[str, int]:
    """Ranks (≥ 1) keeping the singular values with the largest σ² per parameter until `budget`
    parameters are spent (`rule=loss`)."""
    ranks = {n: 1 for n in spectra}
    spent = sum(sum(shape) for _, shape in spectra.values())
    cand = []
    for n, (s2, shape) in spectra.items():
        cost = sum(shape)
        cand += [(float(v) / cost, n, cost) for v in s2[1:min(shape)].tolist()]
    for _, n, cost in sorted(cand, key=lambda c: -c[0]):  # per matrix in descending σ² order: ranks grow by one
        if spent + cost <= budget:
            ranks[n] += 1
            spent += cost
    return ranks


def heterogeneous_ranks(spectra: dict[str, tuple[torch.Tensor, tuple[int, int]]], groups: dict[str, str],
                        param_ratio: float, rule: str = "paper") -> tuple[dict[str, int], dict[str, int]]:
    """({name: rank}, {name: uniform rank}) by the rule in the module docstring.

    spectra: name -> (σ² descending, (out, in)); groups: name -> its type group."""
    uniform = {n: resolve_rank(None, None, *shape, None, param_ratio) for n, (_, shape) in spectra.items()}
    if rule == "loss":
        return loss_optimal_ranks(spectra, sum(uniform[n] * sum(sh) for n, (_, sh) in spectra.items())), uniform
    loss = {n: float(s2[uniform[n]:].sum().sqrt()) for n, (s2, _) in spectra.items()}
    R = 1.0 - param_ratio
    ranks: dict[str, int] = {}
    for g in sorted(set(groups.values())):
        names = [n for n in spectra if groups[n] == g]
        if min(loss[n] for n in names) <= 1.0:
            log.warning("svd_llm_v2: group %s has a truncation loss <= 1 (log <= 0); uniform ranks", g)
            ranks.update({n: uniform[n] for n in names})
            continue
        w = {n: 1.0 / math.log(loss[n]) for n in names}
        total = sum(w.values())
        for n in names:
            out, inp = spectra[n][1]
            removed = len(names) * R * w[n] / total
            r = math.floor((1.0 - removed) * out * inp / (out + inp))
            ranks[n] = min(max(r, 1), min(out, inp))
    cost = {n: sum(spectra[n][1]) for n in spectra}  # parameters per rank: out + in
    budget = sum(uniform[n] * cost[n] for n in spectra)
    spent = sum(ranks[n] * cost[n] for n in spectra)
    while spent > budget:  # clamping overspent: drop the cheapest singular values (σ² per parameter)
        n = min((n for n in spectra if ranks[n] > 1), key=lambda n: float(spectra[n][0][ranks[n] - 1]) / cost[n])
        ranks[n] -= 1
        spent -= cost[n]
    return ranks, uniform


class TruncationLoss(Allocator):
    """`lowrank=svd_llm_v2`'s own allocation (it brings it when `allocation` is null); also usable as
    `allocation=svd_llm_v2` with `path` to reuse a saved one."""

    def __init__(self, rule: str = "paper", path: str | None = None):
        super().__init__("params", None, path)
        if rule not in RULES:
            raise ConfigError(f"allocation.rule={rule!r}: use paper (SVD-LLM V2's 1/log-loss ratios) or loss "
                              "(the least summed truncation loss)")
        self.rule = rule

    def check_levels(self, stages) -> None:
        live = [s for s in stages if s is not None]
        owners = holders(live, "heterogeneous")
        if not owners or len(live) != 1 or getattr(owners[0], "param_ratio", None) is None:
            raise ConfigError("SVD-LLM V2's ratio allocation compresses by low rank alone: use lowrank=svd_llm_v2 "
                              "with lowrank.param_ratio and no pruner or quantizer (or lowrank.heterogeneous=false)")

    def allocate(self, model, calibration, stages, engine) -> dict[str, dict]:
        stage = holders(stages, "heterogeneous")[0]
        probe = SpectrumProbe()
        engine.levels = {}
        engine.run(model, calibration, [probe])
        clear_states(model)
        adapter = adapter_for(model)
        groups = {n: n[len(adapter.blocks) + 1:].split(".", 1)[1] for n in probe.spectra}
        ranks, uniform = heterogeneous_ranks(probe.spectra, groups, stage.param_ratio, self.rule)
        total = sum(out * inp for _, (out, inp) in probe.spectra.values())
        loss = lambda rk: sum(float(probe.spectra[n][0][rk[n]:].sum()) for n in rk)  # noqa: E731
        self.report = {"allocation/target": float(stage.param_ratio),
                       "allocation/met": sum(ranks[n] * sum(sh) for n, (_, sh) in probe.spectra.items()) / total,
                       "allocation/error_sum": loss(ranks), "allocation/error_sum_uniform": loss(uniform)}
        return {n: {"rank": int(r)} for n, r in ranks.items()}
