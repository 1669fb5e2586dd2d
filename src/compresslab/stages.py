"""The small protocols that stages implement, and the per-layer state they leave behind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .stats import LayerStats

STATE_ATTR = "compresslab_state"


@runtime_checkable
class LayerCompressor(Protocol):
    """A pruner, quantizer or low-rank stage. It never loops over layers and never knows the family."""

    needs: frozenset[str]  # statistics of the layer input it uses, e.g. {"hessian"}

    def check(self, name: str, layer: nn.Module) -> None:
        """Raise ConfigError if this layer's shape cannot be compressed as configured."""

    def compress(self, name: str, layer: nn.Linear, stats: LayerStats | None) -> None:
        """Compress `layer` in place; `stats` is None when `needs` is empty."""


@runtime_checkable
class BlockStage(Protocol):
    """A layer compressor that also needs the whole block once its Linears are compressed
    (e.g. SliM-LLM+'s learnable clipping). The engine keeps a dense copy of the block for it."""

    def finish_block(self, dense: nn.Module, block: nn.Module, inputs, forward) -> dict[str, Any]: ...


@runtime_checkable
class Recovery(Protocol):
    """Block-wise: `recover` per block (`forward(block, x, params=None)` runs a block); it may
    return {"deferred": True} or {"outputs": hidden}. End-to-end recoveries define
    `finish_model(model, calibration_ids)` instead."""

    def recover(self, dense: nn.Module, compressed: nn.Module, inputs, forward) -> dict[str, Any]: ...


@dataclass
class LayerState:
    """What a Linear went through: its sparsity pattern and its quantization (scales, zeros, bits)."""

    pattern: str | None = None  # "unstructured" or "N:M"
    quant: Any = None  # quantizer.format.QuantizedWeight (codes dropped; they follow from W)
    act: Any = None  # quantizer.activations.ActQuant applied to the input, if any
    input_scale: Any = None  # (in,) explicit per-input-channel scale (AWQ), stored in fp16
    rel_error: float | None = None  # ‖WX − ŴX‖ / ‖WX‖ on the calibration inputs
    pending_lwc: bool = False  # SliM-LLM+: clip ranges still to be trained at the end of the block
    original: Any = None  # the dense weight while the layer's stages run (then dropped)
    mask: Any = None  # the pruner's keep-mask (bool, out × in) while the layer's stages run (then dropped)
    adapter: Any = None  # lowrank.base.AdapterInfo when low-rank adapters are attached
    factors: Any = None  # (B, A) in fp16 when the layer is replaced by its low-rank factors

    def keep_mask(self, W):
        """The pruning mask to hold in later stages (None when the layer was not pruned). While the
        layer's group is being compressed it is the pruner's own mask; later (recovery, a reloaded
        model) it is W != 0, which also counts weights that quantization rounded to exactly 0."""
        if self.pattern is None:
            return None
        return self.mask if self.mask is not None else W != 0


def fuse_stages(stages: list) -> list:
    """Let a stage absorb the next one when it can do both in one pass (SparseGPT + GPTQ).

    A stage opts in with ``fuse(next_stage) -> fused stage or None``; nothing is keyed on names."""
    out: list = []
    for stage in stages:
        fuse = getattr(out[-1], "fuse", None) if out else None
        fused = fuse(stage) if fuse is not None and stage is not None else None
        if fused is not None:
            out[-1] = fused
        else:
            out.append(stage)
    return out


def layer_state(layer: nn.Module, create: bool = False) -> LayerState | None:
    state = layer.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = LayerState()
        layer.__dict__[STATE_ATTR] = state
    return state


def effective_weight(layer: nn.Module):
    """The (out, in) weight a Linear effectively applies: W, plus B·A when a low-rank adapter is attached."""
    W = layer.weight.detach().float()
    A, B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if A is not None and B is not None:
        W = W + B.detach().float() @ A.detach().float()
    return W
