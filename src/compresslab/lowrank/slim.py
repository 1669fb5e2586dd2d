"""`lowrank=slim`: SLiM-LoRA (Mozaffari et al., ICML 2025), saliency-weighted SVD of the error.

D = diag(√s) with s = mean x² per input channel; SVD of E·D at rank r; L = D⁻¹V_rΣ_r,
R = U_rᵀ (here A = Lᵀ, B = Rᵀ). As in the seed, W − (LR)ᵀ is then re-quantized on the layer's
grid, holding the pruning mask. Unlike the seed (whose AbsMax/SLiM-Quant ranges barely move),
the grid's scales and zeros are kept rather than recomputed, and when the layer's Hessian is at
hand (GPTQ ran) the re-quantized weight is kept only if it lowers the output error; see `after_factor`.
"""

from __future__ import annotations

import torch

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
        if not self.requantize or qw is None:
            return
        # Same scales and zeros as C(W): W − BA = C(W) + (E − BA), so each weight moves to the grid
        # point nearest its compensated value (elementwise never farther than C(W) was).
        C_old = layer.weight.detach().float()
        target = W - B @ A
        C = qw.encode(target).dequantize()
        keep = state.keep_mask(C.device)  # the pruner's mask: pruned weights stay 0
        if keep is not None:
            C = C * keep
        H = stats.hessian if stats is not None and stats.has_hessian else None
        if H is not None:
            # An error-compensating quantizer (GPTQ) shaped E to be small in the output ‖E X‖, not
            # elementwise; plain re-rounding would trade that for RTN-like noise. Keep whichever
            # residual W − BA − C is smaller through H = XᵀX.
            def out_err(Cq):
                F = target - Cq
                return float(((F @ H) * F).sum())

            if out_err(C) >= out_err(C_old):
                return
        layer.weight.data.copy_(C.to(layer.weight.dtype))
