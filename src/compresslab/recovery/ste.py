"""Training compressed Linears without leaving their constraints.

Each compressed Linear gets a latent weight; the block is run with
    Ŵ = mask ⊙ s·(clamp(round_ste(W/s) + z, 0, maxq) − z)
(frozen scales s and zeros z from the layer's QuantizedWeight, optionally trainable scales), so
gradients pass through the rounding (straight-through estimator), pruned weights stay exactly
zero, and the final weights are re-quantized onto the grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from ..errors import ConfigError
from ..stages import layer_state

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")
TRAIN = ("all", "adapters", "scales")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


@contextmanager
def frozen(*modules: nn.Module):
    """Turn off gradients of the modules' own parameters (only the latent copies train), then restore."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_optimizer(name: str, params, lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ConfigError(f"unknown recovery.optimizer={name!r}; use one of {', '.join(OPTIMIZERS)}")


class ConstrainedLinear:
    """Latent parameters of one Linear and the constrained weight they produce."""

    def __init__(self, lin: nn.Linear, train: str, train_scales: bool):
        st = layer_state(lin)
        self.lin = lin
        dev = lin.weight.device
        self.qw = st.quant if st is not None else None
        if self.qw is not None:  # the grid where the layer is now (it may have moved since compression)
            self.qw = replace(self.qw, scales=self.qw.scales.to(dev), zeros=self.qw.zeros.to(dev))
        # the pruner's own mask: a kept weight that quantization rounded to 0 is not pruned and trains
        self.mask = st.keep_mask(lin.weight.device) if st is not None else None
        self.train_weight = train == "all" and not (st is not None and st.adapter is not None and st.adapter.replaces)
        if st is not None and (st.input_scale is not None or st.lut is not None or st.outliers is not None):
            # AWQ (the grid is that of W·diag(s)), a per-row table (SqueezeLLM), fp16 outliers: no uniform grid
            # to train on here, so the weight stays frozen (adapters, if any, still train)
            self.qw, self.train_weight = None, False
        self.W = nn.Parameter(lin.weight.detach().float().clone(), requires_grad=self.train_weight)
        self.scales = None
        if self.qw is not None:
            s = self.qw.scales.detach().float().clone()
            self.scales = nn.Parameter(s, requires_grad=train_scales or train == "scales")
        has_adapter = getattr(lin, "lora_A", None) is not None
        self.A = self.B = None
        if has_adapter and train in ("all", "adapters"):
            self.A = nn.Parameter(lin.lora_A.detach().float().clone())
            self.B = nn.Parameter(lin.lora_B.detach().float().clone())

    def parameters(self):
        return [p for p in (self.W, self.scales, self.A, self.B) if p is not None and p.requires_grad]

    def weight(self) -> torch.Tensor:
        W = self.W
        if self.qw is not None:
            q = self.qw
            s, z = q.expand(self.scales), q.expand(q.zeros.float())
            maxq = torch.as_tensor(q._maxq_full(), device=W.device)
            codes = torch.minimum(torch.clamp(round_ste(W / s) + z, min=0), maxq)
            W = s * (codes - z)
        if self.mask is not None:
            W = W * self.mask
        return W

    def params(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {prefix + "weight": self.weight().to(self.lin.weight.dtype)}
        if self.A is not None:
            out[prefix + "lora_A"] = self.A.to(self.lin.weight.dtype)
            out[prefix + "lora_B"] = self.B.to(self.lin.weight.dtype)
        return out

    @torch.no_grad()
    def commit(self) -> None:
        """Write the constrained weight back: on the grid, masked zeros exact."""
        W = self.weight().detach()
        self.lin.weight.data.copy_(W.to(self.lin.weight.dtype))
        if self.qw is not None and self.scales is not None and self.scales.requires_grad:
            layer_state(self.lin).quant = replace(self.qw, codes=None, scales=self.scales.detach().clone())
        if self.A is not None:
            self.lin.lora_A.data.copy_(self.A.detach().to(self.lin.lora_A.dtype))
            self.lin.lora_B.data.copy_(self.B.detach().to(self.lin.lora_B.dtype))


def constrained(module: nn.Module, train: str, train_scales: bool) -> dict[str, ConstrainedLinear]:
    """ConstrainedLinear for every nn.Linear in `module`, keyed by its name + '.'."""
    if train not in TRAIN:
        raise ConfigError(f"unknown recovery.train={train!r}; use one of {', '.join(TRAIN)}")
    return {n + ".": ConstrainedLinear(m, train, train_scales) for n, m in module.named_modules() if isinstance(m, nn.Linear)}
