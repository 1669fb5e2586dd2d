"""SliM-LLM+: SBA mixed precision with OmniQuant's learnable weight clipping (LWC).

LWC (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language
Models", ICLR 2024): per (row, group), the range is [σ(β)·min W, σ(γ)·max W]; γ and β are trained
block by block with AdamW so that the quantized block's output matches the dense block's output
(MSE), rounding passing gradients straight through. SliM-LLM+ (Huang et al., ICML 2025) uses the
same SBA bit map as SliM-LLM, chosen here with round-to-nearest candidates.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..recovery.ste import frozen, round_ste
from ..stages import layer_state
from .format import QuantizedWeight
from .slim_llm import SliMLLM

log = logging.getLogger(__name__)
INIT_LOGIT = 4.0  # σ(4) ≈ 0.982, OmniQuant's initialization: start near the full range


def lwc_fake_quant(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, maxq: torch.Tensor,
                   group_size: int, return_params: bool = False):
    """Differentiable asymmetric fake quantization of W (out, in) with clip logits γ, β (out, C)
    and per-group maxq (C,)."""
    out, inp = W.shape
    Wg = W.reshape(out, inp // group_size, group_size)  # (out, C, g)
    hi = Wg.amax(-1).clamp_min(0) * torch.sigmoid(gamma)  # (out, C)
    lo = Wg.amin(-1).clamp_max(0) * torch.sigmoid(beta)
    mq = maxq.to(W.dtype)[None, :]  # (1, C)
    scale = ((hi - lo) / mq).clamp_min(1e-8)
    zero = round_ste(-lo / scale)
    q = torch.clamp(round_ste(Wg / scale[..., None]) + zero[..., None], torch.zeros_like(mq)[..., None], mq[..., None])
    W_hat = ((q - zero[..., None]) * scale[..., None]).reshape(out, inp)
    return (W_hat, scale, zero) if return_params else W_hat


class SliMLLMPlus(SliMLLM):
    """`quantizer=slim_llm_plus`: SBA bit map + LWC trained per block.

    Args (beyond slim_llm's bits, group_size, sba, sba_grid): epochs, lr, nsamples (calibration
    samples used for LWC), batch_size, weight_decay.
    """

    needs = frozenset({"hessian", "input_sample"})

    def __init__(self, bits: int = 2, group_size: int = 128, symmetric: bool = False, sba: bool = True,
                 sba_grid=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5), epochs: int = 5, lr: float = 5e-3,
                 nsamples: int = 32, batch_size: int = 4, weight_decay: float = 0.0, percdamp: float = 0.01,
                 act_bits: int | None = None, act_granularity: str | None = None, act_group_size: int = 64):
        if symmetric:
            raise ConfigError("quantizer=slim_llm_plus learns an asymmetric clip range; drop quantizer.symmetric=true")
        super().__init__(bits, group_size, False, sba, False, 1.0, sba_grid, percdamp, 128,
                         act_bits, act_granularity, act_group_size)
        if epochs < 0 or lr <= 0 or nsamples < 1 or batch_size < 1:
            raise ConfigError("quantizer.epochs >= 0, lr > 0, nsamples >= 1 and batch_size >= 1 are required")
        self.epochs, self.lr, self.nsamples, self.batch_size, self.weight_decay = epochs, lr, nsamples, batch_size, weight_decay

    def maxq(self, bit_map, C):
        bits = bit_map if bit_map is not None else torch.full((C,), self.bits)
        return 2 ** bits.float() - 1

    def quantize_with(self, name, W, H, bit_map, keep=None):
        """Round-to-nearest with the bit map: LWC's starting point (and the SBA candidates)."""
        C = W.shape[1] // self.group_size
        logit = torch.full((W.shape[0], C), INIT_LOGIT, device=W.device)
        W_hat, scale, zero = lwc_fake_quant(W.float(), logit, logit, self.maxq(bit_map, C).to(W.device),
                                            self.group_size, return_params=True)
        if keep is not None:
            W_hat = W_hat * keep
        qw = QuantizedWeight(None, scale, zero, self.bits, self.group_size, False, tuple(W.shape),
                             bit_map.to(torch.uint8) if bit_map is not None else None).encode(W_hat)
        return W_hat, qw

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        super().compress(name, layer, stats)
        layer_state(layer).pending_lwc = True

    # -- block stage: called by the engine once every Linear of the block is compressed ----------
    def finish_block(self, dense: nn.Module, block: nn.Module, inputs: torch.Tensor, forward) -> dict:
        """Train the clip logits of this block's Linears against the dense block's outputs.

        `forward(module, x, params=None)` runs a block (with the engine's kwargs) on a batch."""
        lins = {n: m for n, m in block.named_modules()
                if isinstance(m, nn.Linear) and layer_state(m) is not None and layer_state(m).pending_lwc}
        if not lins:
            return {}
        dense_w = {n: dense.get_submodule(n).weight.detach().float() for n in lins}
        g = self.group_size
        logits, maxqs, keeps = {}, {}, {}
        for n, m in lins.items():
            qw = layer_state(m).quant
            C = m.in_features // g
            logits[n] = (torch.full((m.out_features, C), INIT_LOGIT, device=m.weight.device, requires_grad=True),
                         torch.full((m.out_features, C), INIT_LOGIT, device=m.weight.device, requires_grad=True))
            maxqs[n] = self.maxq(qw.bit_map, C).to(m.weight.device)
            keeps[n] = m.weight.detach() != 0 if layer_state(m).pattern else None

        def weights():
            out = {}
            for n in lins:
                W_hat = lwc_fake_quant(dense_w[n], *logits[n], maxqs[n], g)
                out[n + ".weight"] = (W_hat * keeps[n] if keeps[n] is not None else W_hat).to(lins[n].weight.dtype)
            return out

        x = inputs[: self.nsamples]
        with torch.no_grad():
            target = torch.cat([forward(dense, x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        params = [t for pair in logits.values() for t in pair]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def loss_over_data(train: bool) -> float:
            total = 0.0
            for i in range(0, len(x), self.batch_size):
                with torch.set_grad_enabled(train):
                    y = forward(block, x[i:i + self.batch_size], weights())
                    loss = F.mse_loss(y.float(), target[i:i + self.batch_size].float())
                if train:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * len(y)
            return total / len(x)

        with frozen(block):  # only the clip logits train
            before = loss_over_data(False)
            for _ in range(self.epochs):
                loss_over_data(True)
            after = loss_over_data(False)
        with torch.no_grad():
            for n, m in lins.items():
                W_hat, scale, zero = lwc_fake_quant(dense_w[n], *logits[n], maxqs[n], g, return_params=True)
                if keeps[n] is not None:
                    W_hat = W_hat * keeps[n]
                m.weight.data.copy_(W_hat.to(m.weight.dtype))
                st = layer_state(m)
                st.quant = QuantizedWeight(None, scale, zero, self.bits, g, False, tuple(W_hat.shape),
                                           st.quant.bit_map).encode(W_hat).without_codes()
                st.pending_lwc = False
        return {"lwc_mse_before": before, "lwc_mse_after": after}

    def __repr__(self):
        return f"SliMLLMPlus({self._tag()}, sba={self.sba}, epochs={self.epochs}, lr={self.lr})"
