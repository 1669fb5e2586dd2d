"""The small protocols that stages implement, and the per-layer state they leave behind."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
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
    """Block-wise: `recover` per block (`forward(block, x, params=None)` runs a block); it returns its
    report, or {"deferred": True} while it gathers a group of blocks to train together (they stay on
    the compute device until it reports). The engine then propagates the recovered blocks itself.
    End-to-end recoveries define `finish_model(model, calibration_ids, device, ranks)` instead, run on
    the engine's device after the loop."""

    def recover(self, dense: nn.Module, compressed: nn.Module, inputs, forward) -> dict[str, Any]: ...


def pack_mask(keep: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A bool (out, in) mask as 1 bit per weight: (uint8 (out, ⌈in/8⌉), shape)."""
    out, d = keep.shape
    pad = (-d) % 8
    k = torch.nn.functional.pad(keep.to(torch.uint8), (0, pad)).reshape(out, -1, 8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.uint8))
    return (k * weights).sum(-1, dtype=torch.uint8), (out, d)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out, d = shape
    bits = (packed[..., None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return bits.reshape(out, -1)[:, :d].bool()


@dataclass
class LayerState:
    """What a Linear went through: its sparsity pattern and its quantization (scales, zeros, bits)."""

    pattern: str | None = None  # "unstructured" or "N:M"
    quant: Any = None  # quantizer.format.QuantizedWeight (codes dropped; they follow from W)
    act: Any = None  # quantizer.activations.ActQuant applied to the input, if any
    online: Any = None  # rotation.base.OnlineHadamard applied to the input first (rotation R4), if any
    input_scale: Any = None  # (in,) explicit per-input-channel scale (AWQ), stored in fp16
    rel_error: float | None = None  # ‖WX − ŴX‖ / ‖WX‖ on the calibration inputs, after the last stage
    rel_error_oneshot: float | None = None  # the same right after the one-shot stages, when a later
    #                                          stage (SliM-LLM+ clipping, recovery) changed the layer
    numerics: list = field(default_factory=list)  # obs.Numerics of each Hessian factorization (damping, fallback)
    lwc_latent: Any = None  # SliM-LLM+: the weight whose clip range is still to be trained at the end of the block
    original: Any = None  # the dense weight while the layer's stages run (then dropped)
    dense: Any = None  # the dense weight (fp16, CPU) kept for an end-to-end recovery's error measurement
    packed_mask: Any = None  # the pruner's keep-mask, 1 bit per weight: (uint8, shape); see `mask`
    lut: Any = None  # quantizer.format.LUTWeight: non-uniform per-row tables (SqueezeLLM), codes dropped
    outliers: Any = None  # (nnz,) int64 sorted flat indices of weights kept exactly in fp16 (dense-and-sparse)
    adapter: Any = None  # lowrank.base.AdapterInfo when low-rank adapters are attached
    factors: Any = None  # (B, A) in fp16 when the layer is replaced by its low-rank factors
    tokens: int | None = None  # an expert's Linear: calibration tokens the router sent to its expert
    stats_from: str | None = None  # an expert's Linear: "routed", "all" or "all (starved)" (models/moe.py)

    @property
    def mask(self) -> torch.Tensor | None:
        """The pruner's keep-mask (bool, out × in), kept for the layer's whole life: later stages,
        recovery, metrics and the checkpoint hold it (a weight that quantization rounded to exactly 0
        is still kept, and still trains)."""
        return None if self.packed_mask is None else unpack_mask(*self.packed_mask)

    @mask.setter
    def mask(self, keep: torch.Tensor | None) -> None:  # packed on the CPU: no device memory for the layer's life
        self.packed_mask = None if keep is None else pack_mask(keep.bool().cpu())

    def keep_mask(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The pruning mask to hold in later stages (on `device`), None when the layer was not pruned."""
        if self.pattern is None or self.packed_mask is None:
            return None
        keep = self.mask
        return keep if device is None else keep.to(device)

    def take_rows(self, parts: list["LayerState"]) -> None:
        """Take the record of a Linear compressed as blocks of rows (`parts`, top to bottom; row-parallel
        stages only: distributed.py): the masks and grids stacked, the numerics of every block."""
        first = parts[0]
        self.pattern, self.act = first.pattern, first.act
        masks = [p.mask for p in parts]
        if all(m is not None for m in masks):
            self.mask = torch.cat(masks)
        if all(p.quant is not None for p in parts):
            from .quantizer.format import QuantizedWeight

            self.quant = QuantizedWeight.stack_rows([p.quant for p in parts])
        self.numerics = [n for p in parts for n in p.numerics]

    @property
    def compressed(self) -> bool:
        """Pruned or quantized (on a uniform grid or a table): a low-rank stage then compensates C(W)."""
        return self.pattern is not None or self.quant is not None or self.lut is not None

    @property
    def damp(self) -> float | None:
        """The largest damping (percdamp units) any factorization of this layer's Hessian used."""
        return max((n.damp for n in self.numerics), default=None)

    @property
    def fallback(self) -> bool:
        """True when some OBS sweep of this layer fell back to the diagonal (no error propagation)."""
        return any(n.fallback for n in self.numerics)


def stack_rows(items: list[tuple[str, nn.Module]]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """The weights of Linears that share one input, stacked along the output dim, for one OBS sweep:
    (W (Σout, in) float32, their pruners' keep-masks stacked (all-kept rows for an unpruned one) or
    None when none was pruned, the row counts)."""
    W = torch.cat([lin.weight.detach().float() for _, lin in items])
    masks = [layer_state(lin).keep_mask(W.device) if layer_state(lin) is not None else None for _, lin in items]
    keep = None
    if any(m is not None for m in masks):
        keep = torch.cat([m if m is not None else torch.ones_like(lin.weight, dtype=torch.bool, device=W.device)
                          for m, (_, lin) in zip(masks, items)])
    return W, keep, [lin.out_features for _, lin in items]


def sweep_stacked(items: list[tuple[str, nn.Module]], sweep, write) -> None:
    """Linears that share one input (q/k/v, gate/up) through ONE sweep over their stacked rows.

    sweep(W (Σout, in), keep or None, name, sizes, numerics) -> result runs the method's maths once
    (W is a fresh stacked copy: the sweep may overwrite it, e.g. obs_compress(..., overwrite=True));
    write(lin, rows, result) then stores each Linear's row range, and every Linear's state records
    the sweep's factorization numerics (damping retries, fallbacks). Rows never interact in an OBS
    sweep, so this equals separate sweeps when the method keeps per-Linear choices per segment."""
    W, keep, sizes = stack_rows(items)
    numerics: list = []
    result = sweep(W, keep, " + ".join(name for name, _ in items), sizes, numerics)
    for (_, lin), rows in zip(items, row_slices(sizes)):
        layer_state(lin, create=True).numerics.extend(numerics)
        write(lin, rows, result)


def row_slices(sizes: list[int]) -> list[slice]:
    """Consecutive row ranges of the given sizes: [0:a], [a:a+b], ..."""
    out, at = [], 0
    for n in sizes:
        out.append(slice(at, at + n))
        at += n
    return out


def fuse_stages(stages: list) -> list:
    """Let a stage absorb the next one when it can do both in one pass (SparseGPT + GPTQ).

    A stage opts in with ``fuse(next_stage) -> fused stage or None`` (or raises ConfigError when the
    two cannot share a pass as configured); nothing is keyed on names. First, a stage that cannot
    follow the ones before it says so: ``check_after(previous_stages)`` raises ConfigError."""
    stages = [s for s in stages if s is not None]
    for i, stage in enumerate(stages):
        if hasattr(stage, "check_after"):
            stage.check_after(stages[:i])
    out: list = []
    for stage in stages:
        fuse = getattr(out[-1], "fuse", None) if out else None
        fused = fuse(stage) if fuse is not None and stage is not None else None
        if fused is not None:
            out[-1] = fused
        else:
            out.append(stage)
    return out


def is_stage(obj) -> bool:
    return hasattr(obj, "compress") and hasattr(obj, "needs")


def with_levels(stage, levels: dict | None):
    """`stage` with its options named in `levels` set to those values (a shallow copy; stages nested in
    a fused one, e.g. SparseGPT+GPTQ's pruner and quantizer, too). No levels: the stage itself."""
    if not levels:
        return stage
    out = copy.copy(stage)
    for key, value in levels.items():
        if hasattr(out, key) and not callable(getattr(out, key)):
            if hasattr(out, "set_level"):  # a stage whose options move together (a pruner's pattern)
                out.set_level(key, value)
            else:
                setattr(out, key, value)
    for attr, value in list(vars(out).items()):
        if is_stage(value):
            setattr(out, attr, with_levels(value, levels))
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
