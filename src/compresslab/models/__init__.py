"""Model families (where blocks and Linears live) and model loaders."""

from __future__ import annotations


def as_linears(model) -> tuple[int, int]:
    """Right after a model is built or loaded: GPT-2 style Conv1D layers become nn.Linear
    (models/conv1d.py) and fused Mixture-of-Experts tensors become one MLP of Linears per expert
    (models/moe.py), in place, with the same outputs. Returns (Conv1D replaced, experts modules replaced)."""
    from .conv1d import conv1d_to_linear
    from .moe import unfuse_experts

    return conv1d_to_linear(model), unfuse_experts(model)
