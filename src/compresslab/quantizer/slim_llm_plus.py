"""SliM-LLM+: SBA mixed precision with OmniQuant's learnable weight clipping (LWC).

LWC (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language
Models", ICLR 2024): per (row, group), the range is [σ(β)·min W, σ(γ)·max W]; γ and β are trained
block by block with AdamW so that the quantized block's output matches the full-precision model's
(MSE), rounding passing gradients straight through. SliM-LLM+ (Huang et al., ICML 2025) uses the
same SBA bit map as SliM-LLM (chosen here with round-to-nearest candidates).

OmniQuant's protocol, followed here: the targets are the FULL-PRECISION model's block outputs on the
full-precision stream (`fp_inps`), the inputs the quantized model's stream (`quant_inps`); 128
samples, batch size 1, the samples in order each epoch, AdamW with lr 1e-2 and no weight decay,
logits initialised at 4 (σ(4) ≈ 0.98), 20 epochs (40 at W2 in OmniQuant's scripts). The clipping
is learned on the weights the quantizer received (after an earlier pruner's updates), and the
pruner's mask is held.

`init=gptq` (not in the papers) starts from SliM-LLM's GPTQ solution instead of round-to-nearest:
the weights clipped are GPTQ's error-compensated weights as each column was just before rounding
(so rounding them on GPTQ's grid gives GPTQ's result), and the learnable range is GPTQ's grid range
scaled by σ(logit)/σ(4): training starts exactly at the GPTQ solution.

`keep_better` (not in the papers, off by default): a block whose LWC training ends with a higher
training loss than it started with keeps its starting weights (GPTQ's with init=gptq), as BEAM keeps
the one-shot weights. On SmolLM2 W3 g64 the first block's loss rose under LWC from GPTQ's start
(0.048 -> 0.071 at 2 epochs, experiments/results/lwc_probe_w3_e2.md).
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
from .grid import max_code
from .slim_llm import SliMLLM

log = logging.getLogger(__name__)
INIT_LOGIT = 4.0  # σ(4) ≈ 0.982, OmniQuant's initialization: start near the full range


def lwc_fake_quant(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, maxq: torch.Tensor,
                   group_size: int, return_params: bool = False, ref: tuple | None = None,
                   fp16_scale: bool = False):
    """Differentiable asymmetric fake quantization of W (out, in) with clip logits γ, β (out, C)
    and per-group maxq (C,). The range is [σ(β)·min, σ(γ)·max] of each group (OmniQuant), or with
    `ref=(lo, hi)` (out, C) that given range times σ(logit)/σ(4). `fp16_scale` rounds the scale to
    an fp16 value first (what the checkpoint stores)."""
    out, inp = W.shape
    Wg = W.reshape(out, inp // group_size, group_size)  # (out, C, g)
    if ref is None:
        hi = Wg.amax(-1).clamp_min(0) * torch.sigmoid(gamma)  # (out, C)
        lo = Wg.amin(-1).clamp_max(0) * torch.sigmoid(beta)
    else:
        s0 = torch.sigmoid(torch.tensor(INIT_LOGIT))
        hi, lo = ref[1] * torch.sigmoid(gamma) / s0, ref[0] * torch.sigmoid(beta) / s0
    mq = maxq.to(W.dtype)[None, :]  # (1, C)
    scale = ((hi - lo) / mq).clamp_min(1e-8)
    if fp16_scale:
        scale = scale.half().float().clamp_min(2**-24)
    zero = round_ste(-lo / scale)
    q = torch.clamp(round_ste(Wg / scale[..., None]) + zero[..., None], torch.zeros_like(mq)[..., None], mq[..., None])
    W_hat = ((q - zero[..., None]) * scale[..., None]).reshape(out, inp)
    return (W_hat, scale, zero) if return_params else W_hat


class SliMLLMPlus(SliMLLM):
    """`quantizer=slim_llm_plus`: SBA bit map + LWC trained per block (OmniQuant's protocol).

    Args (beyond slim_llm's bits, group_size, sba, sba_grid): epochs (20), lr (1e-2), nsamples
    (calibration samples used for LWC; null = all), batch_size (1), weight_decay (0), init (rtn:
    OmniQuant's start | gptq: SliM-LLM's GPTQ solution, see the module docstring), keep_better
    (a block keeps its start when LWC raised its training loss).
    """

    needs = frozenset({"hessian", "input_sample"})
    grids = ("asym",)

    def __init__(self, bits: int = 2, group_size: int = 128, grid: str = "asym", sba: bool = True,
                 sba_grid=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5), epochs: int = 20, lr: float = 1e-2,
                 nsamples: int | None = None, batch_size: int = 1, weight_decay: float = 0.0,
                 percdamp: float = 0.01, init: str = "rtn", keep_better: bool = False, act_bits: int | None = None,
                 act_granularity: str | None = None, act_group_size: int = 64):
        # SQC only shapes the GPTQ start (init=gptq); OmniQuant's LWC replaces it otherwise
        super().__init__(bits, group_size, grid, sba, init == "gptq", 1.0, sba_grid, percdamp, 128,
                         act_bits, act_granularity, act_group_size)
        if epochs < 0 or lr <= 0 or (nsamples is not None and nsamples < 1) or batch_size < 1 or weight_decay < 0:
            raise ConfigError("quantizer.epochs >= 0, lr > 0, nsamples >= 1 (or null), batch_size >= 1 and "
                              "weight_decay >= 0 are required")
        if init not in ("rtn", "gptq"):
            raise ConfigError(f"quantizer.init={init!r}: use rtn (OmniQuant's start) or gptq (SliM-LLM's solution)")
        self.epochs, self.lr, self.nsamples, self.batch_size, self.weight_decay = epochs, lr, nsamples, batch_size, weight_decay
        self.init, self.keep_better = init, keep_better
        self._dense_in = None
        self._blocks_left = None  # set by begin(); None: called block by block without the engine

    def maxq(self, bit_map, C):
        bits = bit_map if bit_map is not None else torch.full((C,), self.bits)
        return max_code(bits.float(), "asym")

    def quantize_with(self, name, W, H, bit_map, keep=None, numerics=None, latent=None):
        """LWC's starting point with the chosen bit map: round-to-nearest at the initial clip, or
        (init=gptq) SliM-LLM's GPTQ sweep."""
        if self.init == "gptq":
            return super().quantize_with(name, W, H, bit_map, keep, numerics, latent)
        C = W.shape[1] // self.group_size
        logit = torch.full((W.shape[0], C), INIT_LOGIT, device=W.device)
        W_hat, scale, zero = lwc_fake_quant(W.float(), logit, logit, self.maxq(bit_map, C).to(W.device),
                                            self.group_size, return_params=True)
        if keep is not None:
            W_hat = W_hat * keep
        qw = QuantizedWeight(None, scale, zero, self.bits, self.group_size, "asym", tuple(W.shape),
                             bit_map.to(torch.uint8) if bit_map is not None else None).encode(W_hat)
        return W_hat, qw

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        state = layer_state(layer, create=True)
        W = layer.weight.detach().float().clone()  # what LWC clips: the weights as this stage got them,
        latent = [] if self.init == "gptq" else None  # or GPTQ's pre-rounding ones (init=gptq)
        _, _, W_hat, qw = self.search(name, W, stats, state.keep_mask(W.device), state.numerics, latent)
        self.finish(layer, W_hat, qw)
        state.lwc_latent = latent[0] if latent else W

    def compress_group(self, items, stats):
        """One Linear at a time: each keeps its own LWC start (and latent), nothing to stack."""
        for name, lin in items:
            self.compress(name, lin, stats)

    # -- block stage: called by the engine once every Linear of the block is compressed ----------
    def begin(self, num_blocks: int, ranks=None) -> None:
        self._dense_in = None  # the full-precision stream (OmniQuant's fp_inps), carried block to block
        self._blocks_left = num_blocks

    def finish_block(self, dense: nn.Module, block: nn.Module, inputs: torch.Tensor, forward) -> dict:
        """Train the clip logits of this block's Linears so that the block, on the quantized stream
        `inputs`, matches the full-precision block on the full-precision stream.

        `forward(module, x, params=None)` runs a block (with the engine's kwargs) on a batch."""
        lins = {n: m for n, m in block.named_modules()
                if isinstance(m, nn.Linear) and layer_state(m) is not None and layer_state(m).lwc_latent is not None}
        x = inputs if self.nsamples is None else inputs[: self.nsamples]
        dense_in = x if self._dense_in is None else self._dense_in
        bs = self.batch_size
        with torch.no_grad():
            target = torch.cat([forward(dense, dense_in[i:i + bs]) for i in range(0, len(x), bs)])
        if self._blocks_left is not None:
            self._blocks_left -= 1
        # the next block's full-precision input (freed after the last block)
        self._dense_in = None if self._blocks_left == 0 else target
        if not lins:
            return {}
        g = self.group_size
        latent, logits, maxqs, keeps, refs = {}, {}, {}, {}, {}
        for n, m in lins.items():
            st = layer_state(m)
            C = m.in_features // g
            latent[n] = st.lwc_latent.to(m.weight.device)
            refs[n] = None
            if self.init == "gptq":  # GPTQ's grid range per (row, group): [s·(0 − z), s·(maxq − z)]
                qs, qz = st.quant.scales.to(m.weight.device), st.quant.zeros.to(m.weight.device)
                refs[n] = (qs * (0 - qz), qs * (self.maxq(st.quant.bit_map, C).to(qs.device)[None] - qz))
            logits[n] = (torch.full((m.out_features, C), INIT_LOGIT, device=m.weight.device, requires_grad=True),
                         torch.full((m.out_features, C), INIT_LOGIT, device=m.weight.device, requires_grad=True))
            maxqs[n] = self.maxq(st.quant.bit_map, C).to(m.weight.device)
            keeps[n] = st.keep_mask(m.weight.device)  # the pruner's own mask: a weight rounded to 0 still trains

        def weights():
            out = {}
            for n in lins:
                W_hat = lwc_fake_quant(latent[n], *logits[n], maxqs[n], g, ref=refs[n])
                out[n + ".weight"] = (W_hat * keeps[n] if keeps[n] is not None else W_hat).to(lins[n].weight.dtype)
            return out

        params = [t for pair in logits.values() for t in pair]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def loss_over_data(train: bool) -> float:
            total = 0.0
            for i in range(0, len(x), bs):  # in order, as OmniQuant
                with torch.set_grad_enabled(train):
                    y = forward(block, x[i:i + bs], weights())
                    loss = F.mse_loss(y.float(), target[i:i + bs].float())
                if train:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * len(y)
            return total / len(x)

        with frozen(block):  # only the clip logits train
            before = loss_over_data(False)
            curve = [loss_over_data(True) for _ in range(self.epochs)]
            after = loss_over_data(False)
        if self.keep_better and after > before:  # training made the block worse: keep its start
            log.info("LWC raised the block's loss (%.4g -> %.4g): keeping the starting weights", before, after)
            for m in lins.values():
                layer_state(m).lwc_latent = None
            return {"lwc_mse_before": before, "lwc_mse_after": after, "lwc_curve": curve, "lwc_kept": "start"}
        with torch.no_grad():
            for n, m in lins.items():
                W_hat, scale, zero = lwc_fake_quant(latent[n], *logits[n], maxqs[n], g, return_params=True,
                                                    ref=refs[n], fp16_scale=True)
                if keeps[n] is not None:
                    W_hat = W_hat * keeps[n]
                m.weight.data.copy_(W_hat.to(m.weight.dtype))
                st = layer_state(m)
                st.quant = QuantizedWeight(None, scale, zero, self.bits, g, "asym", tuple(W_hat.shape),
                                           st.quant.bit_map).encode(W_hat).without_codes()
                st.lwc_latent = None
        return {"lwc_mse_before": before, "lwc_mse_after": after, "lwc_curve": curve}

    def __repr__(self):
        return (f"SliMLLMPlus({self._tag()}, sba={self.sba}, epochs={self.epochs}, lr={self.lr}, init={self.init}, "
                f"keep_better={self.keep_better})")
