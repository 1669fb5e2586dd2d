"""The ONE sequential layer loop.

Calibration activations stream block by block: block i's compressed outputs are block i+1's
inputs. Only the current block is on the compute device (with a block-wise recovery that trains
several blocks together, the blocks of the group not yet trained); each group's statistics are
freed as soon as its Linears are compressed.

Two ways through a block:

- one pass (``chunk_size=None``, the whole calibration batch in one forward): a forward
  pre-hook on each Linear group compresses the group right before its first use. The single
  forward is at once calibration, true-sequential order and propagation.
- sequential (``chunk_size=k``, when memory is short): per group, stream the chunks up to the
  group (the hook stops the forward there) to accumulate statistics, compress, and finally run
  the compressed block once over all chunks to propagate.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .layer_error import ErrorMeter, hessian_rel_error
from .models.adapters import Adapter, adapter_for
from .hostmem import Heap, reuse_freed_memory
from .plan import Plan, make_plan, parse_memory, resolve_budget, with_reuse
from .stages import effective_weight, fuse_stages, layer_state, with_levels
from .errors import ConfigError
from .stats import SAMPLE_MAX, LayerStats
from .utils import resolve_device, to_device

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward early."""


def _stop(*_):
    """A hook that ends the forward here."""
    raise _Stop


@dataclass
class _Held:
    """A block on the compute device, with its dense copy (or the dense model's block) and homes."""

    index: int
    block: nn.Module
    home: torch.device
    dense: nn.Module | None
    dense_home: torch.device | None


def _bind_block_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument by name) of a call `block(*args, **kwargs)`: families
    pass the mask and more by position (GPT-2: block(h, cache, mask, ...)), and the engine calls
    block(h, **named). The cache is dropped and use_cache turned off where the block takes it."""
    import inspect

    sig = inspect.signature(type(block).forward)
    bound = sig.bind(block, *args, **kwargs)
    params = sig.parameters
    named: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is self
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ConfigError(f"{type(block).__name__} is called with {len(value)} extra positional arguments "
                                  "compresslab cannot name; add an adapter in src/compresslab/models/adapters.py")
        else:
            named[name] = value
    first = next(n for n in list(params)[1:] if params[n].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                         inspect.Parameter.VAR_KEYWORD))
    hidden = named.pop(first)
    for k in ("past_key_values", "past_key_value", "layer_past", "cache"):
        named.pop(k, None)
    if "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        named["use_cache"] = False
    return hidden, named


def _as_linears(model: nn.Module, routers: bool = False) -> None:
    """A model loaded outside compresslab's loaders (compress(model) on a transformers model): GPT-2 style
    Conv1D and fused MoE experts become Linears now, as the loaders do (models.as_linears), or the traced
    groups would not find them and they would stay dense. `routers`: MoE routers' projections become
    Linears too (engine.moe_router=compress; models/moe.py)."""
    from .models import as_linears
    from .models.moe import linear_routers

    conv, moe = as_linears(model)
    if conv or moe:
        log.info("%s: %d Conv1D and %d fused experts modules are nn.Linear from here on", type(model).__name__,
                 conv, moe)
    if routers and linear_routers(model):
        log.info("%s: its MoE routers are compressed too (engine.moe_router=compress)", type(model).__name__)


def _common_prefix(parts: list[list[str]]) -> list[str]:
    """The dotted path all of `parts` start with, up to the last module before they differ."""
    out = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        out.append(level[0])
    return out[:-1] if len(out) == min(len(p) for p in parts) else out


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _needs(stages) -> frozenset[str]:
    """The statistics some stage asks for."""
    return frozenset().union(*(s.needs for s in stages)) if stages else frozenset()


def _fit_kwargs(kwargs: dict, batch: int, captured_batch: int) -> dict:
    """Block kwargs captured for a batch of `captured_batch`, sliced for a smaller last chunk."""
    if batch == captured_batch:
        return kwargs

    def fit(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == captured_batch and captured_batch > 1:
            return v[:batch]
        if isinstance(v, tuple):
            return tuple(fit(t) for t in v)
        return v

    return {k: fit(v) for k, v in kwargs.items()}


class SequentialEngine:
    """Runs compression stages over every target Linear of a model, block by block.

    Args:
        device: compute device ('auto': cuda when available, else cpu).
        chunk_size: calibration samples per forward; None runs all of them at once (one pass); 'auto'
            lets the memory plan choose (one pass when it fits `max_memory`, else chunks).
        max_memory: the engine's budget above the loaded model ('40GB', '1.5GB', bytes), 'auto' (most
            of the device's free memory at the start of the run) or None (no limit: one pass).
        progress: show a tqdm bar over blocks.
        layer_error: collect each group's Hessian even when no stage needs it, so that every
            Linear reports ‖WX − ŴX‖/‖WX‖ on the calibration inputs. By default the error is
            reported whenever some stage already collects the Hessian.
        moe_calibration: where Mixture-of-Experts experts take their statistics from: 'routed' (the
            tokens the router sends each) or 'all' (every token; outputs still routed). models/moe.py.
        moe_min_tokens: an expert routed fewer tokens of the calibration set takes its statistics from
            all tokens (recorded per expert as `stats_from`).
        moe_router: 'dense' (routers stay as they are) or 'compress' (every stage compresses each MoE
            router's projection too, as a Linear reading the MoE block's input).
        distributed: 'auto' (several processes when launched so: torchrun, or srun with several tasks;
            data-parallel calibration, weight-parallel compression, distributed.py) or 'off'.
        dist_timeout_s: how long a collective waits for the other ranks before the run fails.
    """

    def __init__(self, device: str = "auto", chunk_size: int | str | None = "auto", max_memory: int | str | None = None,
                 progress: bool = True, layer_error: bool = False, moe_calibration: str = "routed",
                 moe_min_tokens: int = 64, moe_router: str = "dense", distributed: str = "auto",
                 dist_timeout_s: float = 1800.0):
        if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size >= 1)):
            raise ConfigError(f"engine.chunk_size must be auto, null (one pass) or an int >= 1, got {chunk_size!r}")
        parse_memory(max_memory)  # a bad size fails now, before any model is loaded
        from .models.moe import check_calibration, check_router

        check_calibration(moe_calibration, moe_min_tokens)
        check_router(moe_router)
        self.moe = (moe_calibration, moe_min_tokens)
        self.moe_router = moe_router
        if distributed not in ("auto", "off"):
            raise ConfigError(f"engine.distributed={distributed!r} must be auto (several ranks when launched by "
                              "torchrun or srun) or off")
        if not isinstance(dist_timeout_s, (int, float)) or isinstance(dist_timeout_s, bool) or dist_timeout_s <= 0:
            raise ConfigError(f"engine.dist_timeout_s={dist_timeout_s!r} must be a number of seconds > 0")
        self.distributed, self.dist_timeout_s = distributed, float(dist_timeout_s)
        self._ranks = None  # joined on first use (`ranks`)
        self.device = resolve_device(device)
        self.chunk_size = chunk_size
        self.max_memory = max_memory
        self.progress = progress
        self.layer_error = layer_error
        self.plan: Plan | None = None  # set per run
        self.levels: dict[str, dict] = {}  # per Linear name, options its stages take (an allocation's levels)
        self._chunk = chunk_size if isinstance(chunk_size, int) else None  # samples per forward this run
        self._keep_dense = False  # set per run: an end-to-end recovery measures errors after the loop
        self._lean = lambda block: contextlib.nullcontext()  # set per run: the adapter's `lean`
        self._source = self._sink = None  # set per run: a streamed model's block source and sink
        self._heap = Heap()  # set per run: the host allocator's policy (hostmem.py)
        self._fisher: dict | None = None  # set per run: the diagonal Fisher by Linear name (needs "fisher")

    # -- public -------------------------------------------------------------------------------
    @property
    def ranks(self):
        """This process's place among the ranks compressing one model (distributed.py); the process
        group is joined on first use, and on CUDA the engine's device becomes the local rank's GPU."""
        if self._ranks is None:
            from .distributed import Ranks, init_ranks

            self._ranks = init_ranks(self.device, self.dist_timeout_s) if self.distributed == "auto" else Ranks()
            self.device = getattr(self._ranks, "device", self.device)
        return self._ranks

    def check(self, model_or_meta: nn.Module, stages: Sequence) -> None:
        """Let every stage validate every target Linear (works on a meta-device model)."""
        _as_linears(model_or_meta, routers=self.moe_router == "compress")
        adapter = adapter_for(model_or_meta)
        for name, lin in adapter.named_linears(model_or_meta):
            for stage in stages:
                stage.check(name, lin)

    def check_ranks(self, stages: Sequence, recovery=None) -> None:
        """On several ranks, what trains (a recovery, a block-level stage) must know how to share the
        work (`data_parallel`); checked before anything loads."""
        if self.ranks.world == 1:
            return
        trains = [s for s in stages if s is not None and hasattr(s, "finish_block")] + [recovery]
        odd = [type(s).__name__ for s in trains if s is not None and not getattr(s, "data_parallel", False)]
        if odd:
            raise ConfigError(f"{', '.join(odd)} cannot train on several ranks yet (torch.distributed): run it in one "
                              "process (no torchrun / one SLURM task)")

    @torch.no_grad()
    def run(self, model: nn.Module, calibration: torch.Tensor | None, stages: Sequence, recovery=None,
            keep_outputs: bool = False, dense_model: nn.Module | None = None, source=None,
            sink=None) -> dict[str, Any]:
        """Compress `model` in place. Returns {'time/compress_s', 'recovery': [...], 'outputs'?}.

        Streaming (stream.py): with a `source`, each block is materialised by `source.load(i, block)`
        before its turn and returned by `source.free(i, block)` once final, after `sink(i, block)`
        (e.g. a CheckpointWriter's add_block) has taken what it keeps.

        `dense_model`: for recovery of a model compressed elsewhere, its dense blocks are the
        targets (instead of copies taken before compression).

        A block stays on the compute device until nothing will change it any more: with a block-wise
        recovery that trains `block_granularity` blocks together (it answers {"deferred": True}
        until the group's last block), the group's blocks and their dense copies wait there, and are
        released together once the group is trained. A block that a finisher or a recovery changed
        is propagated again from its input with an ErrorMeter attached, so each Linear's
        `rel_error` is measured on the layer as it finally is."""
        t0 = time.perf_counter()
        for m in (model, dense_model):
            if m is not None:
                _as_linears(m, routers=self.moe_router == "compress")
        adapter = adapter_for(model)
        self._lean = adapter.lean
        stages = fuse_stages([s for s in stages if s is not None])
        self.check(model, stages)
        needs = _needs(stages)
        if self.layer_error and stages:
            needs |= {"hessian"}
        uses_data = bool(needs) or recovery is not None or keep_outputs
        blocks = adapter.block_list(model)
        result: dict[str, Any] = {"recovery": [], "blocks": []}
        finishers = [s for s in stages if hasattr(s, "finish_block")]  # block-level stages (BlockStage)
        uses_data = uses_data or bool(finishers)
        block_recovery = recovery if hasattr(recovery, "recover") else None
        ranks = self.ranks
        self.check_ranks(stages, recovery)
        if ranks.world > 1 and calibration is not None:  # data parallel: this rank's share of the samples
            calibration = calibration[ranks.shard(calibration.shape[0])]
        # an end-to-end recovery changes every layer after the loop: keep the dense weights to measure
        # then (a recovery of a model compressed elsewhere measures against `dense_model` instead)
        self._keep_dense = hasattr(recovery, "finish_model") and bool(stages) and dense_model is None
        self._source, self._sink = source, sink
        self._fisher = self._fisher_pass(model, adapter, calibration) if "fisher" in needs else None
        self.plan = None
        if uses_data and calibration is not None:
            param = next(model.parameters())
            self.plan = self._make_plan(model.config, adapter, *calibration.shape, stages, needs, block_recovery,
                                        bool(finishers), param.device, param.dtype)
            result["plan"] = self.plan
            self._chunk = self.plan.chunk_size
        try:
            with reuse_freed_memory(self.plan is not None and self.plan.reuse_freed) as self._heap:
                self._loop(model, adapter, blocks, calibration, stages, needs, uses_data, finishers,
                           block_recovery, keep_outputs, dense_model, result)
        finally:
            self._source = self._sink = self._fisher = None
            self._heap = Heap()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        result["time/compress_s"] = time.perf_counter() - t0
        result["ranks"] = ranks.summary(result["time/compress_s"])  # several ranks: each one's compute and comm
        return result

    def _fisher_pass(self, model, adapter, calibration):
        """The diagonal Fisher of every target Linear (fisher.py), before the loop, on the dense model where
        it lives; several ranks each take their share of the windows and sum."""
        if self._source is not None:
            raise ConfigError("a stage needs the Fisher information (gradients of the whole model), which a model "
                              "streamed from disk (model.offload=disk) cannot give: use model.offload=null")
        if calibration is None:
            raise ValueError("the Fisher information needs calibration data; pass calibration=(N, T) token ids")
        from .fisher import fisher_diagonal

        t0 = time.perf_counter()
        fisher, n = fisher_diagonal(model, calibration, list(adapter.named_linears(model)), self.progress,
                                    reduce=self.ranks.all_reduce_ if self.ranks.world > 1 else None)
        log.info("fisher: %d windows, %.1f s", n, time.perf_counter() - t0)
        return fisher

    def _loop(self, model, adapter, blocks, calibration, stages, needs, uses_data, finishers, block_recovery,
              keep_outputs, dense_model, result) -> None:
        """The block loop of `run` (see there)."""
        if not uses_data:  # pure weight methods (magnitude, RTN): no forward at all
            for i, block in enumerate(tqdm(blocks, desc="compress", disable=not self.progress)):
                self._load(i, block)
                home = next(block.parameters()).device
                block.to(self.device)
                for group in adapter.linear_groups(block):
                    self._compress_group(adapter, i, group, stages, None)
                self._release_entry(_Held(i, block, home, None, None))
        else:
            if calibration is None:
                raise ValueError("these stages need calibration data; pass calibration=(N, T) token ids")
            hidden, kws = self._capture(model, adapter, calibration)
            for s in [*finishers, block_recovery]:
                if s is not None and hasattr(s, "begin"):
                    s.begin(len(blocks), self.ranks)
            held: list[_Held] = []  # blocks of a recovery group not yet trained (on the device)
            group_in = None  # the hidden states entering the first of them
            for i, block in enumerate(tqdm(blocks, desc="compress", disable=not self.progress)):
                self._heap.tidy(keep=self.plan.est_bytes)  # the last block's freed memory beyond the plan goes back
                kwargs = kws[i]
                self._load(i, block)
                home = next(block.parameters()).device
                block.to(self.device)
                if dense_model is not None:
                    dense = adapter.block_list(dense_model)[i]
                    dense_home = next(dense.parameters()).device
                    dense.to(self.device)
                else:
                    dense = copy.deepcopy(block) if block_recovery is not None or finishers else None
                    dense_home = None
                entry = _Held(i, block, home, dense, dense_home)
                groups = adapter.linear_groups(block)
                if self._chunk is None:
                    out = self._one_pass(adapter, i, block, groups, stages, needs, hidden, kwargs)
                else:
                    out = self._sequential(adapter, i, block, groups, stages, needs, hidden, kwargs)
                changed = False
                for stage in finishers:
                    rep = stage.finish_block(dense, block, hidden, self._block_fn(kwargs))
                    if rep:
                        result["blocks"].append({"block": i, **rep})
                    changed = True
                if block_recovery is None:
                    if changed:  # measure the finished block and propagate it
                        hidden = self._measure_and_propagate(adapter, [entry], hidden, kws)
                    elif out is None:
                        hidden = self._propagate(block, hidden, kwargs)
                    else:
                        hidden = out
                    self._release_entry(entry)
                    continue
                if not held:
                    group_in = hidden
                held.append(entry)
                per_block = {m: kws[e.index] for e in held for m in (e.block, e.dense)}  # a group's blocks
                rep = dict(block_recovery.recover(dense, block, hidden, self._block_fn(kwargs, per_block)) or {})
                if rep.pop("deferred", False):  # the group goes on: the next block needs this one's outputs
                    hidden = self._propagate(block, hidden, kwargs) if out is None or changed else out
                    continue
                result["recovery"].append({"block": i, **rep})
                # the group is trained: its blocks are final; measure them on the recovered stream
                hidden = self._measure_and_propagate(adapter, held, group_in, kws)
                for e in held:
                    self._release_entry(e)
                held, group_in = [], None
            if held:  # a recovery that deferred its last group and never trained it: release anyway
                log.warning("%s left blocks %s untrained", type(block_recovery).__name__, [e.index for e in held])
                for e in held:
                    self._release_entry(e)
            if keep_outputs:
                result["outputs"] = hidden
            del hidden

    @torch.no_grad()
    def stream_hidden(self, model: nn.Module, ids: torch.Tensor, source, progress: bool = False) -> torch.Tensor:
        """(W, T, C): the last block's outputs for (W, T) token windows, one window per forward, with
        each block materialised by `source` for its turn and freed after (a streamed model's eval)."""
        adapter = adapter_for(model)
        self._lean = adapter.lean
        plan, chunk = self.plan, self._chunk
        self.plan, self._chunk = None, 1  # one window per forward, as the in-memory eval runs
        try:
            hidden, kws = self._capture(model, adapter, ids)
            for i, block in enumerate(tqdm(adapter.block_list(model), desc="blocks", disable=not progress,
                                           leave=False)):
                source.load(i, block)
                try:
                    block.to(self.device)
                    hidden = self._propagate(block, hidden, kws[i])
                finally:
                    source.free(i, block)
        finally:
            self.plan, self._chunk = plan, chunk
        return hidden

    @torch.no_grad()
    def measure_model(self, model: nn.Module, ids: torch.Tensor, dense_model: nn.Module | None = None) -> None:
        """After an end-to-end recovery: every Linear's error against its dense weight (`dense_model`'s
        when given, else the one kept in `state.dense`, then freed), over the calibration ids on the
        compute device, in the engine's chunks; the forward stops before the output head (no logits)."""
        adapter = adapter_for(model)
        dense_linears = dict(adapter.named_linears(dense_model)) if dense_model is not None else {}
        layers = {}
        for name, lin in adapter.named_linears(model):
            st = layer_state(lin)
            if name in dense_linears:
                layers[name] = (lin, dense_linears[name].weight.detach())
            elif st is not None and st.dense is not None:
                layers[name] = (lin, st.dense)
        if not layers:
            return
        home = next(model.parameters()).device
        model.to(self.device)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        handle = head.register_forward_pre_hook(_stop) if head is not None else None
        try:
            with ErrorMeter(layers) as meter:
                for sl in self._chunks(ids.shape[0]):
                    try:
                        model(input_ids=ids[sl].to(self.device), use_cache=False)
                    except _Stop:
                        pass
            meter.record()
        finally:
            if handle is not None:
                handle.remove()
            model.to(home)
            for lin, _ in layers.values():
                if layer_state(lin) is not None:
                    layer_state(lin).dense = None

    # -- planning -----------------------------------------------------------------------------
    def check_plan(self, meta_model: nn.Module, n: int, t: int, stages: Sequence, recovery=None,
                   dtype: torch.dtype = torch.float32) -> Plan | None:
        """Before any weights load: with an explicit `max_memory`, the plan for an (n, t) calibration
        is made now, so a budget too small for one sample fails before loading. (`auto` depends on the
        memory free after loading: planned at the start of the run.)"""
        if parse_memory(self.max_memory) in (None, "auto"):
            return None
        stages = [s for s in stages if s is not None]
        needs = _needs(stages)
        if self.layer_error and stages:  # as `run` does: Hessians for every group's error
            needs |= {"hessian"}
        finishers = any(hasattr(s, "finish_block") for s in stages)
        if not (needs or recovery is not None or finishers):
            return None  # weight-only: no calibration forward to plan
        block_recovery = recovery if hasattr(recovery, "recover") else None
        return self._make_plan(meta_model.config, adapter_for(meta_model), n, t, stages, needs, block_recovery,
                               finishers, torch.device("cpu"), dtype, quiet=True)

    def _make_plan(self, config, adapter, n: int, t: int, stages, needs, recovery, finishers: bool,
                   home: torch.device, dtype: torch.dtype, quiet: bool = False) -> Plan:
        """The memory plan of this run (see plan.py), logged once."""
        size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        # the lean MLP holds one (tokens, I) tensor, two when a stage hooks up's input (activation quantization)
        act_quant = any(getattr(x, "act_bits", None) for s in stages for x in (s, getattr(s, "quantizer", None)))
        mlp_copies = 3 if adapter.gated_mlp is None else 2 if act_quant else 1
        budget = resolve_budget(self.max_memory, self.device)
        plan = make_plan(config, n, t, budget=budget, chunk_size=self.chunk_size, device=self.device,
                         mlp_writer=adapter.residual_mlp_out is not None, act_bytes=size, param_bytes=size,
                         mlp_copies=mlp_copies,
                         hessian="hessian" in needs, dense_copy=recovery is not None or finishers,
                         block_on_device=home != self.device, train_batch=getattr(recovery, "batch_size", 0) or 0)
        if quiet:
            return plan
        plan = with_reuse(plan, self.device, self.max_memory, streamed=self._source is not None)
        if budget is not None and plan.est_bytes > budget:
            log.warning("%s exceeds engine.max_memory: set engine.chunk_size=auto to let the plan chunk",
                        plan.describe())
        else:
            log.info(plan.describe())
        return plan

    # -- placement ----------------------------------------------------------------------------
    def _release(self, module: nn.Module, home: torch.device) -> None:
        """A block (or its dense copy) is done on the compute device: back to where it lived."""
        module.to(home)

    def _load(self, i: int, block: nn.Module) -> None:
        if self._source is not None:  # a streamed model: the block comes from disk now
            self._source.load(i, block)

    def _release_entry(self, e: "_Held") -> None:
        """A block is final: back to its home; when streamed, to the sink, then freed."""
        self._release(e.block, e.home)
        if e.dense is not None and e.dense_home is not None:  # a dense model's block (recover())
            self._release(e.dense, e.dense_home)
        e.dense = None
        if self._sink is not None:
            self._sink(e.index, e.block)
        if self._source is not None:
            self._source.free(e.index, e.block)

    def _measure_and_propagate(self, adapter, entries: list["_Held"], hidden, kws):
        """Run final blocks one after another from `hidden`, measuring each target Linear's error
        against its dense copy; returns the last block's outputs."""
        for e in entries:
            layers = {name: (lin, e.dense.get_submodule(name).weight.detach())
                      for group in adapter.linear_groups(e.block) for name, lin in group}
            with ErrorMeter(layers) as meter:
                hidden = self._propagate(e.block, hidden, kws[e.index])
            meter.combine(self.ranks)  # several ranks: the errors over every rank's samples
            meter.record()
        return hidden

    # -- steps --------------------------------------------------------------------------------
    def _chunks(self, n: int) -> list[slice]:
        size = n if self._chunk is None else self._chunk
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def _capture(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor):
        """Hidden states entering block 0 for all samples, (N, T, C) on the device, and each block's
        kwargs, [dict] per block: families whose layers differ (Gemma's sliding-window and global
        layers get their own mask and rotary) give each its own; blocks given the same objects share
        one dict. The blocks do not run: each is replaced by a stub that records its call."""
        blocks = adapter.block_list(model)
        pre = adapter.input_modules(model)
        homes = [next(m.parameters(), torch.empty(0)).device for m in pre]
        for m in pre:
            m.to(self.device)
        per_block: list[dict | None] = [None] * len(blocks)
        hidden_parts = []

        def stub(i):
            def forward(*args, **kwargs):
                h, kw = _bind_block_call(blocks[i], args, kwargs)
                if i == 0:
                    hidden_parts.append(self._to_stream(h))
                if per_block[i] is None:
                    per_block[i] = kw
                if per_block[-1] is not None:  # every block's kwargs known: the rest of the model is not needed
                    raise _Stop
                return h  # the next stub ignores it
            return forward

        saved = [vars(b).pop("forward", None) for b in blocks]
        for i, b in enumerate(blocks):
            b.forward = stub(i)
        try:
            for sl in self._chunks(ids.shape[0]):
                try:
                    model(input_ids=ids[sl].to(self.device), use_cache=False)
                except _Stop:
                    pass
                except Exception as e:  # the model's own code between blocks, fed the stubs' outputs
                    if per_block[0] is None:
                        raise
                    raise ConfigError(f"{type(model).__name__}: the forward failed after block 0 while compresslab "
                                      f"recorded each block's arguments ({type(e).__name__}: {e}); this family "
                                      "needs an adapter in src/compresslab/models/adapters.py") from e
            missing = [i for i, kw in enumerate(per_block) if kw is None]
            if missing:
                raise ConfigError(f"{type(model).__name__}: blocks {missing[:5]} were never called by the model's "
                                  "forward; compresslab cannot tell their arguments")
        finally:
            for b, f in zip(blocks, saved):
                del b.forward
                if f is not None:
                    b.forward = f
            for m, home in zip(pre, homes):
                m.to(home)
        hidden = torch.cat(hidden_parts) if len(hidden_parts) > 1 else hidden_parts[0]  # (N, T, C)
        if self.plan is not None and self.plan.hidden_on_host and self.device.type == "cuda":
            hidden = hidden.pin_memory()  # chunks move to the device asynchronously
        shared: dict[tuple, dict] = {}
        kws = []
        for kw in per_block:
            key = tuple((k, id(v)) for k, v in kw.items())
            if key not in shared:
                shared[key] = {**to_device(kw, self.device), "_batch": hidden_parts[0].shape[0]}
            kws.append(shared[key])
        return hidden, kws

    def _forward(self, block, x, kwargs, params=None):
        """Run `block` on a batch with the captured kwargs, optionally with some parameters
        replaced (torch.func.functional_call)."""
        kw = _fit_kwargs({k: v for k, v in kwargs.items() if k != "_batch"}, x.shape[0], kwargs["_batch"])
        if x.device != self.device:  # hidden states kept on the host: this chunk to the device
            x = x.to(self.device, non_blocking=True)
        if params:
            from torch.func import functional_call

            return _block_out(functional_call(block, params, (x,), kw, strict=False))
        with self._lean(block):  # the adapter's lower-memory forward (same result), no-grad only
            return _block_out(block(x, **kw))

    def _block_fn(self, kwargs, per_block: dict | None = None):
        """forward(block, x, params=None) for block-level stages and recoveries; `per_block`: the
        kwargs of each block (and dense copy) a recovery group runs, by module."""
        if per_block:
            return lambda block, x, params=None: self._forward(block, x, per_block.get(block, kwargs), params)
        return lambda block, x, params=None: self._forward(block, x, kwargs, params)

    def _to_stream(self, h: torch.Tensor) -> torch.Tensor:
        """Where the hidden states live between blocks: the host when the plan says so, else the device."""
        if self.plan is not None and self.plan.hidden_on_host:
            return h.to("cpu")
        return h

    def _propagate(self, block, hidden, kwargs):
        out = (torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True) if hidden.is_pinned()
               else torch.empty_like(hidden))
        for sl in self._chunks(hidden.shape[0]):
            out[sl] = self._forward(block, hidden[sl], kwargs)
        return out

    def _compress_group(self, adapter, i, group, stages, stats):
        ranks = self.ranks
        ranks.reduce(stats)  # several ranks: every rank's statistics summed (distributed.py)
        if stats is not None and not stats.n:  # would divide by zero tokens
            raise RuntimeError(f"block {i}: the forward never called {[n for n, _ in group]}; no statistics")
        if stats is not None and self._fisher is not None:  # this group's share of the gradient pass
            names = [f"{adapter.blocks}.{i}.{name}" for name, _ in group]
            stats.attach_fisher({n: self._fisher[n].to(self.device) for n in names if n in self._fisher})
        H = stats.hessian if stats is not None and stats.has_hessian else None
        keep_original = (H is not None or self._keep_dense
                         or any(getattr(s, "uses_original", False) for s in stages))
        items = [(f"{adapter.blocks}.{i}.{name}", lin) for name, lin in group]
        originals = []
        for _, lin in items:
            original = lin.weight.detach().float().clone() if keep_original else None
            if original is not None:  # the dense weight, for stages that compensate the error (low-rank)
                layer_state(lin, create=True).original = original
            originals.append(original)
        mine, plan = ranks.work(items, stages)  # weight parallel: this rank's Linears or row blocks (one rank: all)
        hooks = [(set(lin._forward_pre_hooks), set(lin._forward_hooks)) for _, lin in items]
        for stage in stages:  # stage by stage over the group; Linears of one stage never interact
            for levels, part in self._by_levels(mine):  # an allocation's per-layer options (allocation/)
                s = with_levels(stage, levels)
                if len(part) > 1 and hasattr(s, "compress_group"):
                    s.compress_group(part, stats)  # e.g. one OBS sweep for q/k/v (they share H)
                else:
                    for full_name, lin in part:
                        s.compress(full_name, lin, stats)
        ranks.share(items, plan, hooks)  # each Linear's (or row block's) result from its owner to every rank
        for (_, lin), original in zip(items, originals):
            state = layer_state(lin)
            if state is not None:  # the dense weight lives only while the group runs (the mask stays)
                if self._keep_dense and original is not None:
                    state.dense = original.to(lin.weight.dtype).cpu()  # for the error after an end-to-end recovery
                state.original = None
            if H is not None:  # ‖(W − Ŵ)X‖ / ‖WX‖ through H, Ŵ the effective weight
                layer_state(lin).rel_error = hessian_rel_error(original, effective_weight(lin), H)

    def _by_levels(self, items):
        """Consecutive runs of `items` that share their levels (`self.levels`, by Linear name): [(levels, part)]."""
        runs: list = []
        for item in items:
            lv = self.levels.get(item[0]) or None
            if runs and runs[-1][0] == lv:
                runs[-1][1].append(item)
            else:
                runs.append((lv, [item]))
        return runs

    def _one_pass(self, adapter, i, block, groups, stages, needs, hidden, kwargs):
        handles, states = [], []
        for group in groups:
            state = {"handles": []}

            def hook(mod, args, group=group, state=state):
                state["fired"] = True
                for h in state["handles"]:  # fires once: later calls of the group run unhooked
                    h.remove()
                x = args[0]  # (N, T, d_in), already the output of this block's compressed groups
                stats = LayerStats(needs, x.shape[-1], x.device) if needs else None
                if stats is not None:
                    stats.add_batch(x)
                before = set(mod._forward_pre_hooks)
                self._compress_group(adapter, i, group, stages, stats)
                if stats is not None:
                    stats.free()
                # Pre-hooks a stage just attached (e.g. activation quantization) apply from this call on.
                for key, fn in list(mod._forward_pre_hooks.items()):
                    if key not in before:
                        args = fn(mod, args) or args
                return args

            state["handles"] = [lin.register_forward_pre_hook(hook) for _, lin in group]
            handles += state["handles"]
            states.append(state)
        try:
            with adapter.calibrating(block, *self.moe, reduce=self.ranks.sum_counts):  # one forward: every token at once
                out = self._forward(block, hidden, kwargs)
        finally:
            for h in handles:
                h.remove()
        idle = [[n for n, _ in g] for g, st in zip(groups, states) if not st.get("fired")]
        if idle:  # would stay dense without a word
            raise RuntimeError(f"block {i}: the forward never called {idle[:3]}; they were not compressed")
        return out

    def _sequential(self, adapter, i, block, groups, stages, needs, hidden, kwargs):
        """Per group, stream the chunks up to the group to accumulate its statistics, then compress it.
        When the block ends in a residual MLP branch (adapter.mlp_branch: h + mlp(norm(h))), the residual
        h entering it is kept for all samples once the attention groups are done (in the buffer the
        outputs need anyway): the MLP's groups then run only the branch from h, and the outputs are
        h + mlp(norm(h)), so the attention is not run again for them. When h = x + o(a) for a Linear o
        that is a group of its own (adapter.residual_writer), its statistics pass also keeps its input a
        in that buffer and h is computed from it once o is compressed: the attention runs once per chunk.
        Likewise, when the plan has room (`keep_mlp_input`) and block(x) = h + down(p) (adapter.mlp_writer),
        down's statistics pass keeps p for all samples and the outputs are h + down(p): gate/up run once.
        Groups of one wave (adapter.group_waves: an MoE block's experts) share their statistics passes.
        Returns the block's outputs when the branch computed them, else None (the caller propagates)."""
        branch = adapter.mlp_branch(block)
        writer = adapter.residual_writer(block)
        out_writer = adapter.mlp_writer(block) if self.plan is not None and self.plan.keep_mlp_input else None
        h = None  # (N, T, C): the residual entering the MLP branch (first the writer's input a)
        p = None  # (N, T, I): down's input, kept when the plan says so
        waves = {w[0]: w for w in adapter.group_waves(block) if len(w) > 1} if needs else {}
        in_wave = {g for w in waves.values() for g in w}
        routed = None  # where the block's routers send the tokens, over all chunks (MoE: see _routing)
        for g, group in enumerate(groups):
            if g in waves:  # e.g. every expert's gate/up: one pass observes them all
                wave = [groups[k] for k in waves[g]]
                if routed is None:
                    routed = self._routing(adapter, block, [groups[k] for k in waves[max(waves)]], hidden, kwargs)
                self._wave(adapter, i, block, wave, stages, needs, hidden, kwargs, routed)
            if g in in_wave:
                continue
            lin0 = group[0][1]
            stats = LayerStats(needs, lin0.in_features, self.device) if needs else None  # hooks see device tensors
            in_branch = branch is not None and g in branch[2]
            if in_branch and h is None:
                h = self._residual(block, branch[0], hidden, kwargs)
            keep = writer is not None and g == writer[0] and stats is not None
            if keep:
                h = self._stream_like(hidden)
            keep_p = out_writer is not None and g == out_writer[0] and stats is not None
            if keep_p:
                p = torch.empty((*hidden.shape[:2], lin0.in_features), dtype=hidden.dtype, device=hidden.device)
            at = {}

            def observe(_mod, args, stats=stats):
                if stats is not None:
                    stats.add_batch(args[0])
                raise _Stop  # nothing after this group is needed yet

            def capture(_mod, args, keep=keep, keep_p=keep_p):
                # the Linear's own input, before its other pre-hooks (a rotation's online Hadamard): what it is
                # called with below, lin(a) / lin(p), which applies them
                if keep:
                    h[at["sl"]] = args[0]
                if keep_p:
                    p[at["sl"]] = args[0]

            def run(sl, in_branch=in_branch):
                at["sl"] = sl
                if in_branch:
                    self._branch(block, branch, h[sl])
                else:
                    self._forward(block, hidden[sl], kwargs)

            if stats is not None:
                grab = lin0.register_forward_pre_hook(capture, prepend=True) if keep or keep_p else None
                try:
                    self._until_hook(lin0, observe, run, hidden.shape[0])
                finally:
                    if grab is not None:
                        grab.remove()
            self._compress_group(adapter, i, group, stages, stats)
            if stats is not None:
                stats.free()
            if keep:  # h = x + o(a), o as compressed (the stage may have replaced the module)
                lin = block.get_submodule(writer[1])
                for sl in self._chunks(h.shape[0]):
                    a = h[sl].to(self.device, non_blocking=True)
                    h[sl] = hidden[sl].to(self.device, non_blocking=True) + lin(a)
        if h is None:
            return None
        if p is not None:  # the outputs, h + down(p), down as compressed, in h's buffer
            lin = block.get_submodule(out_writer[1])
            for sl in self._chunks(h.shape[0]):
                h[sl] = h[sl] + lin(p[sl])
            del p
            return h
        for sl in self._chunks(h.shape[0]):  # the outputs, h + mlp(norm(h)), in h's buffer
            x = h[sl].to(self.device, non_blocking=True)
            h[sl] = x + self._branch(block, branch, x)
        return h

    def _routing(self, adapter, block, last_wave, hidden, kwargs) -> dict:
        """Once per block, before its first wave: the chunks run up to the module holding the last wave
        (after its router) while `adapter.routing` counts where the routers send every token, so that
        rules on an expert's token count (moe_min_tokens) see the whole calibration set, as in one pass."""
        with adapter.routing(block) as counts:
            self._until_hook(self._owner(block, last_wave), _stop, lambda sl: self._forward(block, hidden[sl], kwargs),
                             hidden.shape[0])
        return {m: self.ranks.sum_counts(c) for m, c in counts.items()}  # several ranks: the whole set's

    @staticmethod
    def _owner(block, wave) -> nn.Module:
        """The innermost module holding every group of a wave (an MoE block's experts)."""
        owner = ".".join(_common_prefix([group[0][0].split(".") for group in wave]))
        return block.get_submodule(owner) if owner else block

    def _wave(self, adapter, i, block, wave, stages, needs, hidden, kwargs, routed=None):
        """Groups whose inputs do not depend on each other's compression (adapter.waves: the experts of
        an MoE block), observed together: per chunk one forward up to the end of the module that holds
        them, then each compressed. As many at once as the memory plan has room for (their statistics
        live together), so a wave may take a few passes."""
        stop_at = self._owner(block, wave)
        d = max(g[0][1].in_features for g in wave)
        per_pass = self._wave_size(d, needs)
        for start in range(0, len(wave), per_pass):
            part = wave[start:start + per_pass]
            stats = [LayerStats(needs, g[0][1].in_features, self.device) for g in part]
            handles = [g[0][1].register_forward_pre_hook(lambda _m, args, st=st: st.add_batch(args[0]))
                       for g, st in zip(part, stats)]
            try:  # nothing after the wave's module is needed yet
                with adapter.calibrating(block, *self.moe, routed):
                    self._until_hook(stop_at, _stop, lambda sl: self._forward(block, hidden[sl], kwargs),
                                     hidden.shape[0], after=True)
            finally:
                for h in handles:
                    h.remove()
            for group, st in zip(part, stats):
                self._compress_group(adapter, i, group, stages, st)
                st.free()

    def _wave_size(self, d: int, needs) -> int:
        """Groups of input width d whose statistics fit beside the plan's estimate in its budget (the plan
        counted one group's already), at least 1; without a budget, in most of the memory free now."""
        per_group = (4 * d * d if "hessian" in needs else 0) + (4 * SAMPLE_MAX * d if "input_sample" in needs else 0)
        per_group += 4 * 4 * d  # the per-channel vectors
        budget = self.plan.budget if self.plan is not None else None
        if budget is None:
            budget = resolve_budget("auto", self.device)
            if budget is None:  # free memory unknown: one at a time
                return 1
            return max(1, int(budget // per_group))
        return max(1, int((budget - self.plan.est_bytes) // per_group) + 1)

    @staticmethod
    def _stream_like(hidden: torch.Tensor) -> torch.Tensor:
        """An empty buffer like the hidden-state stream (pinned host memory when the stream is)."""
        return (torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True) if hidden.is_pinned()
                else torch.empty_like(hidden))

    def _residual(self, block, norm, hidden, kwargs):
        """(N, T, C): the input of `norm` (the residual stream entering the MLP branch) for all samples;
        each chunk's forward stops there."""
        out = self._stream_like(hidden)
        at = {}

        def grab(_mod, args):
            out[at["sl"]] = args[0]
            raise _Stop

        def run(sl):
            at["sl"] = sl
            self._forward(block, hidden[sl], kwargs)

        self._until_hook(norm, grab, run, hidden.shape[0])
        return out

    def _until_hook(self, module, hook, run, n: int, after: bool = False) -> None:
        """run(chunk) for every chunk of n samples with `hook` (which raises _Stop) before `module` (after
        it, with `after`)."""
        handle = module.register_forward_hook(hook) if after else module.register_forward_pre_hook(hook)
        try:
            for sl in self._chunks(n):
                try:
                    run(sl)
                except _Stop:
                    pass
        finally:
            handle.remove()

    def _branch(self, block, branch, x):
        """mlp(norm(x)) for one chunk of the residual stream."""
        norm, mlp = branch[0], branch[1]
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        with self._lean(block):
            return mlp(norm(x))
