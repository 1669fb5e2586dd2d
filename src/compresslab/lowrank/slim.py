"""`lowrank=slim`: SLiM-LoRA (Mozaffari et al., ICML 2025), saliency-weighted SVD of the error.

D = diag(√s) with s = mean x² per input channel; SVD of E·D at rank r; L = D⁻¹V_rΣ_r,
R = U_rᵀ (here A = Lᵀ, B = Rᵀ). As in the seed, W − (LR)ᵀ is then re-quantized on the layer's
grid (same bits, group size, symmetry and mask) with fresh ranges, so the quantized part and the
adapters split the weight rather than the adapters only patching the error.
"""

from __future__ import annotations

import torch

from ..quantizer.rtn import rtn_quantize
from ..stages import layer_state
from .base import LowRank


class SLiMLoRA(LowRank):
    needs = frozenset({"act_norm"})

    def __init__(self, *args, requantize: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.requantize = requantize

    def transform(self, W, E, stats):
        return stats.act_norm.float().clamp_min(1e-8), None  # ∝ √(mean x²): the scale cancels in A

    def after_factor(self, name, layer, W, E, B, A, stats):
        state = layer_state(layer)
        qw = state.quant
        if not self.requantize or qw is None or qw.bit_map is not None or qw.group_size < 1:
            return
        keep = layer.weight.detach() != 0 if state.pattern is not None else None
        target = W - B @ A
        if keep is not None:
            target = target * keep
        g = qw.group_size if qw.group_size < W.shape[1] else -1
        new = rtn_quantize(target, qw.bits, g, qw.symmetric)
        C = new.dequantize()
        if keep is not None:
            C = C * keep
        layer.weight.data.copy_(C.to(layer.weight.dtype))
        state.quant = new.without_codes()
