"""`lowrank=svd_llm_v2`: SVD-LLM V2 (Wang et al., "SVD-LLM V2: Optimizing Singular Value Truncation for
Large Language Model Compression", NAACL 2025).

Two parts:
- Loss-optimized truncation: instead of SVD-LLM's Cholesky factor of XXᵀ (which fails or loses accuracy
  when XXᵀ is near singular), a first decomposition XXᵀ = QΛQᵀ and then the SVD of E·Q√Λ, truncated and
  mapped back by Λ^{-1/2}Qᵀ (`eigen_whitening`). Dropping singular value σ_k of E·Q√Λ costs exactly σ_k²
  of the output error ‖(E − BA)X‖²_F, the theoretical minimum at each rank.
- Heterogeneous ratios (with `param_ratio`, as the paper compresses): each matrix's theoretical
  truncation loss at the uniform ratio decides its own ratio within the matrices of its type
  (allocation/svd_llm_v2.py), under the same total parameter budget. The measuring pass and the
  per-layer ranks are the `allocation` machinery; `allocation=` given explicitly replaces it.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import LowRank, whitened_svd
from .eora import eigen_whitening


class SVDLLMv2(LowRank):
    """Args (beyond LowRank's): heterogeneous: per-matrix ranks from the truncation losses (needs
    param_ratio); false: every matrix at param_ratio (or rank / rank_ratio). rule: paper (the paper's
    ratios) | loss (the least summed truncation loss, allocation/svd_llm_v2.py)."""

    needs = frozenset({"hessian"})

    def __init__(self, *args, heterogeneous: bool = True, rule: str = "paper", **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(heterogeneous, bool):
            raise ConfigError(f"lowrank.heterogeneous={heterogeneous!r} must be true or false")
        if heterogeneous and self.param_ratio is None:
            raise ConfigError("lowrank.heterogeneous=true allocates a parameter budget: set lowrank.param_ratio "
                              "(e.g. 0.8 for a 20% cut), or lowrank.heterogeneous=false for uniform ranks")
        if self.param_ratio is not None and self.rank is not None:
            raise ConfigError("lowrank.param_ratio and lowrank.rank both set each layer's rank: keep one")
        from ..allocation.svd_llm_v2 import RULES

        if rule not in RULES:
            raise ConfigError(f"lowrank.rule={rule!r}: use paper (SVD-LLM V2's 1/log-loss ratios) or loss (the least "
                              "summed truncation loss under the same parameter total)")
        self.heterogeneous, self.rule = heterogeneous, rule

    def default_allocation(self):
        """The allocation this stage brings when `allocation` is null: SVD-LLM V2's ratio rule."""
        if not self.heterogeneous:
            return None
        from ..allocation.svd_llm_v2 import TruncationLoss

        return TruncationLoss(self.rule)

    def check_level(self, key: str, value) -> None:
        """An allocated per-layer `rank` takes the place of param_ratio's uniform one."""
        if key == "rank" and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"an allocated rank must be an int >= 1, got {value!r}")

    def layer_rank(self, out: int, inp: int) -> int:
        if self.rank is not None and self.param_ratio is not None:  # allocated
            return min(self.rank, out, inp)
        return super().layer_rank(out, inp)

    def transform(self, W, E, stats):
        return eigen_whitening(stats.hessian)

    def factor(self, W, E, stats, r, numerics=None, name=""):
        return whitened_svd(E, r, *eigen_whitening(stats.hessian))
