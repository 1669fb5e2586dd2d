"""transformers' GPT-2 style `Conv1D` (y = x W + b, W stored (in, out)) as `nn.Linear`.

The engine and every stage compress `nn.Linear` (W (out, in)); a family built from Conv1D (GPT-2,
its relatives) is turned into Linears right after loading: the same outputs to float rounding
(x Wᵀᵀ is the same product), the weight transposed once. Packed checkpoints store the Linears; a
streamed (offload) load of such a family is refused, since its shards hold the (in, out) layout.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without it has no such models either
        return None
    return Conv1D


def has_conv1d(model: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every Conv1D of `model` by the equivalent nn.Linear, in place (on the same device and
    dtype, meta included). Returns how many were replaced."""
    cls = _conv1d_class()
    if cls is None:
        return 0
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]
    for name, conv in todo:
        d_in, d_out = conv.weight.shape  # Conv1D keeps (in, out)
        lin = nn.Linear(d_in, d_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        if not conv.weight.is_meta:
            lin.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return len(todo)
