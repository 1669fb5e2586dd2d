"""Activation (Linear input) fake quantization, applied by a forward pre-hook.

- 8 bits: FP8 e4m3 (``torch.float8_e4m3fn``) with one dynamic scale per tensor, amax/448.
- fewer bits: symmetric integer AbsMax, one scale per token or per group of channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
GRANULARITIES = ("tensor", "token", "group")


def fake_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    scale = x.detach().abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fake_quant_int(x: torch.Tensor, bits: int, granularity: str = "token", group_size: int = 64) -> torch.Tensor:
    """Symmetric AbsMax integer fake quantization, levels in [−(2^(b−1)−1), 2^(b−1)−1]."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    if granularity == "tensor":
        view = xf.reshape(1, -1)
    elif granularity == "token":
        view = xf.reshape(-1, x.shape[-1])  # (tokens, C)
    elif granularity == "group":
        view = xf.reshape(-1, group_size)  # (tokens·C/g, g)
    else:
        raise ConfigError(f"unknown act_granularity={granularity!r}; use one of {', '.join(GRANULARITIES)}")
    scale = view.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.clamp(torch.round(view / scale), -qmax, qmax) * scale).reshape(x.shape).to(x.dtype)


class ActQuant:
    """The forward pre-hook: fake-quantizes a Linear's input."""

    def __init__(self, bits: int, granularity: str | None = None, group_size: int = 64):
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"quantizer.act_bits={bits!r} is out of range; use 2..8 or null (off)")
        granularity = granularity or ("tensor" if bits == 8 else "token")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"unknown quantizer.act_granularity={granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if bits == 8 and granularity != "tensor":
            raise ConfigError("quantizer.act_bits=8 is FP8 e4m3 with a per-tensor scale; "
                              "set quantizer.act_granularity=tensor (or null), or use act_bits<=7 for int per token/group")
        if granularity == "group" and group_size < 1:
            raise ConfigError(f"quantizer.act_group_size must be >= 1, got {group_size}")
        self.bits, self.granularity, self.group_size = bits, granularity, group_size

    def check(self, name: str, layer: nn.Module) -> None:
        if self.granularity == "group" and layer.in_features % self.group_size:
            raise ConfigError(f"quantizer.act_group_size={self.group_size} does not divide the input width "
                              f"{layer.in_features} of {name}; pick a divisor of it")

    def __call__(self, module, args):
        x = args[0]
        q = fake_quant_fp8(x) if self.bits == 8 else fake_quant_int(x, self.bits, self.granularity, self.group_size)
        return (q, *args[1:])

    def __repr__(self):
        kind = "fp8-e4m3" if self.bits == 8 else f"int{self.bits}"
        return f"ActQuant({kind}, {self.granularity})"
