"""`lowrank=l2qer`: LQER / L²QER (Zhang et al., "LQER: Low-Rank Quantization Error Reconstruction
for LLMs", ICML 2024): SVD of E·S with the activation scale S = diag(mean |x|)."""

from .base import LowRank


class L2QER(LowRank):
    needs = frozenset({"act_absmean"})

    def transform(self, W, E, stats):
        return stats.act_absmean.float().clamp_min(1e-8), None
