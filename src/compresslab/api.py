"""The Python API: compress and evaluate an in-memory model, no Hydra involved.

    from compresslab import compress, evaluate
    from compresslab.pruner.magnitude import Magnitude
    from compresslab.quantizer.rtn import RTN

    report = compress(model, tok, pruner=Magnitude(0.5, "2:4"), quantizer=RTN(bits=4, group_size=64))
    print(report.metrics["sparsity"], evaluate(model, tok))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .engine import SequentialEngine
from .metrics import (compression_summary, experts_summary, peak_rss_gb, peak_rss_since_reset_gb, reset_peak_rss,
                      summarize)


@dataclass
class CompressionReport:
    metrics: dict[str, float]  # sparsity, avg_bits, time/compress_s, memory/peak_rss_gb, ...
    layers: list[dict[str, Any]] = field(default_factory=list)  # one row per compressed Linear
    recovery: list[dict[str, Any]] = field(default_factory=list)
    experts: list[dict[str, Any]] = field(default_factory=list)  # MoE: one row per expert (tokens, stats_from)


def _calibration_ids(calibration, tokenizer) -> torch.Tensor | None:
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if callable(calibration):  # e.g. data.calibration.CalibrationData
        if tokenizer is None:
            raise ValueError("calibration data needs the tokenizer: compress(model, tokenizer, ...)")
        return calibration(tokenizer)
    raise TypeError(f"calibration must be None, an (N, T) LongTensor or a CalibrationData, got {type(calibration)}")


def _finish_model(recovery, model, ids, result: dict, engine: SequentialEngine, dense_model=None) -> None:
    """End-to-end recovery (finetune) after the block loop, on the engine's device, its time counted
    with the compression; then every Linear's error is measured again (it changed)."""
    if recovery is not None and hasattr(recovery, "finish_model"):
        t0 = time.perf_counter()
        result["recovery"].append(recovery.finish_model(model, ids, engine.device, engine.ranks))
        engine.measure_model(model, ids, dense_model)
        result["time/compress_s"] += time.perf_counter() - t0


def _plan_metrics(plan, engine: SequentialEngine) -> dict[str, float]:
    """The memory plan's estimate beside what was measured (`memory/peak_device_gb` on CUDA)."""
    out = {}
    if plan is not None:
        out["memory/plan_gb"] = plan.est_bytes / 1e9
        if plan.budget is not None:
            out["memory/budget_gb"] = plan.budget / 1e9
        out["engine/chunk_size"] = float(plan.chunk_size or 0)  # 0: one pass
        out["engine/reuse_freed"] = float(plan.reuse_freed)  # 1: the host allocator kept freed blocks (hostmem.py)
    if engine.device.type == "cuda":
        out["memory/peak_device_gb"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
    return out


def compress(model, tokenizer=None, *, pruner=None, quantizer=None, lowrank=None, recovery=None,
             calibration: torch.Tensor | Callable | None = None, allocation=None, allocation_dir=None,
             engine: SequentialEngine | None = None, source=None, sink=None) -> CompressionReport:
    """Compress `model` in place: prune, then quantize, then low-rank, block by block; then recover.
    `allocation`: an allocator (allocation/, e.g. `OWL`) that first sets each Linear's level (written
    to `allocation_dir`/allocation.yaml when given); None: the one a stage brings (SVD-LLM V2's
    heterogeneous ranks), if any. A streamed model (stream.py) passes its block `source` and a
    `BlockSink`; the per-layer figures then come from the sink (each block was summarised before it
    was freed)."""
    from .allocation.base import stage_default

    engine = engine or SequentialEngine()
    ids = _calibration_ids(calibration, tokenizer)
    stages = [s for s in (pruner, quantizer, lowrank) if s is not None]
    allocation = allocation if allocation is not None else stage_default(stages)
    before = {}  # without an allocation, the engine's `levels` are the caller's (e.g. set from a saved file)
    if allocation is not None:  # per-layer levels, which the engine gives each layer's stages
        if not stages:
            raise ValueError("an allocation sets levels of the pruner, quantizer or low-rank stage: pass one")
        allocation.check(stages)
        t0 = time.perf_counter()
        engine.levels = allocation.levels(model, ids, stages, engine, allocation_dir)
        before = {"time/allocation_s": time.perf_counter() - t0, **allocation.report}
        if peak_rss_since_reset_gb() is not None:
            before["memory/allocation_peak_rss_gb"] = peak_rss_since_reset_gb()
            reset_peak_rss()  # memory/compress_peak_rss_gb stays the compression's own
    result = engine.run(model, ids, [pruner, quantizer, lowrank], recovery, source=source, sink=sink)
    _finish_model(recovery, model, ids, result, engine)
    if sink is not None:
        summary, layers = summarize(sink.counts), sink.rows
    else:
        summary, layers = compression_summary(model)
    peak = peak_rss_gb()
    since = peak_rss_since_reset_gb()  # the caller may have reset it after loading: the compression's own peak
    metrics = {**summary, "time/compress_s": result["time/compress_s"], "memory/peak_rss_gb": peak,
               "memory/compress_peak_rss_gb": peak if since is None else since}  # the first: a run's final peak
    metrics.update(_plan_metrics(result.get("plan"), engine))
    metrics.update(before)
    moe, experts = experts_summary(layers)
    metrics.update(moe)
    metrics.update(result.get("ranks", {}))  # dist/world_size, dist/rank<r>/compute_s, comm_s, comm_gb
    return CompressionReport(metrics, layers, result["recovery"], experts)


def recover(dense_model, compressed_model, tokenizer=None, *, recovery, calibration=None,
            engine: SequentialEngine | None = None) -> CompressionReport:
    """Run a recovery (e.g. Beam) on a model compressed elsewhere or loaded from a checkpoint,
    against its dense original: the BEAM seed's `beam_recovery(original, compressed, ...)`."""
    engine = engine or SequentialEngine()
    ids = _calibration_ids(calibration, tokenizer)
    if ids is None:
        raise ValueError("recover() needs calibration=(N, T) token ids or a CalibrationData")
    result = engine.run(compressed_model, ids, [], recovery, dense_model=dense_model)
    _finish_model(recovery, compressed_model, ids, result, engine, dense_model)
    summary, layers = compression_summary(compressed_model)
    metrics = {**summary, "time/recover_s": result["time/compress_s"], "memory/peak_rss_gb": peak_rss_gb()}
    return CompressionReport(metrics, layers, result["recovery"])


def evaluate(model, tokenizer, evals: Callable | Iterable[Callable] | None = None, prefix: str = "") -> dict[str, float]:
    """Run evaluators (default: wikitext2 perplexity) and merge their metrics, keys prefixed by `prefix`."""
    if evals is None:
        from .eval.ppl import Perplexity

        evals = [Perplexity()]
    elif callable(evals):
        evals = [evals]
    model.eval()
    out: dict[str, float] = {}
    for ev in evals:
        out.update({prefix + k: v for k, v in ev(model, tokenizer).items()})
    return out
