"""What a run reports: sparsity, storage bits, memory, environment, and the atomic metrics.json."""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.adapters import adapter_for
from .pruner.masks import nm_valid, parse_pattern
from .stages import layer_state


def layer_storage_bits(layer: nn.Linear) -> int:
    """Bits this Linear's weight takes in the packed checkpoint (`compresslab.checkpoint`), exactly:
    codes packed at their width (or fp16 values), fp16 scales, zero points at the codes' width
    (none when symmetric), SliM-LLM bit maps (a byte per group), N:M sparse weights as their kept n
    of m plus ⌈log2 m⌉ bits of position each (2:4 -> 2 bits), unstructured sparsity as a 1-bit mask
    plus the kept entries (1 + (1 − s)·b bits per weight: below s = 1/b that is more than the dense
    codes, the price of keeping the pruner's mask exact), AWQ input scales, and low-rank adapters or factors. The bias is not counted."""
    from .checkpoint.layer import pack_linear, storage_bits

    return storage_bits(pack_linear(layer)[1])


def layer_params(layer: nn.Linear) -> int:
    """Parameters stored for this Linear: its weight (or its factors) plus any adapters."""
    state = layer_state(layer)
    adapter = state.adapter if state is not None else None
    if adapter is None:
        return layer.weight.numel()
    r = adapter.rank
    factors = r * (layer.in_features + layer.out_features)
    return factors if adapter.replaces else layer.weight.numel() + factors


def layer_summary(name: str, lin: nn.Linear, bits: int | None = None) -> tuple[dict[str, Any], tuple[int, ...]]:
    """One Linear's row of the per-layer table, and its counts for `summarize`:
    (pruned, zeros, numel, storage bits, stored params, fell back, damping raised). `bits`: its storage
    bits when the caller packed it already (a checkpoint writer), else counted here."""
    w = lin.weight.detach()
    state = layer_state(lin)
    mask = state.keep_mask(w.device) if state is not None else None
    p = int((~mask).sum()) if mask is not None else 0
    z = int((w == 0).sum())
    b = layer_storage_bits(lin) if bits is None else bits
    nm = parse_pattern(state.pattern) if state and state.pattern else None
    row = {
        "name": name, "shape": list(w.shape), "sparsity": p / w.numel(), "zero_fraction": z / w.numel(),
        "avg_bits": b / w.numel(), "pattern": state.pattern if state else None,
        "bits": (state.quant.bits if state and state.quant is not None else
                 state.lut.bits if state and state.lut is not None else None),
        "group_size": state.quant.group_size if state and state.quant is not None else None,
        "grid": state.quant.grid if state and state.quant is not None else None,
        "nm_valid": (nm_valid(mask, nm) and not bool(w[~mask.to(w.device)].any())
                     if nm is not None and mask is not None else None),
        "rel_error": state.rel_error if state else None,
    }
    if state is not None and state.rel_error_oneshot is not None:
        row["rel_error_oneshot"] = state.rel_error_oneshot  # before SliM-LLM+ clipping / recovery
    fell = raised = 0
    if state is not None and state.numerics:
        row["damp"], row["fallback"] = state.damp, state.fallback
        fell, raised = int(state.fallback), int(any(n.retries for n in state.numerics))
    if state is not None and state.adapter is not None:
        row["rank"] = state.adapter.rank
    if state is not None and state.outliers is not None:  # weights kept exactly (dense-and-sparse)
        row["outliers"] = state.outliers.numel() / w.numel()
    if state is not None and state.tokens is not None:  # an expert (models/moe.py)
        row["tokens"], row["stats_from"] = state.tokens, state.stats_from
    return row, (p, z, w.numel(), b, layer_params(lin), fell, raised)


def summarize(counts: list[tuple[int, ...]]) -> dict[str, float]:
    """The run's compression figures from `layer_summary` counts of every target Linear."""
    pruned, zeros, numel, bits, stored, fallbacks, raised = (sum(c[k] for c in counts) for k in range(7))
    d = max(numel, 1)
    return {"sparsity": pruned / d, "zero_fraction": zeros / d, "avg_bits": bits / d,
            "params/compressed": float(numel), "params/ratio": stored / d, "fallbacks": float(fallbacks),
            "damp_raised": float(raised)}


def experts_summary(layers: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mixture-of-Experts figures from the per-layer rows: one row per expert (its name, the calibration
    tokens routed to it, where its statistics came from) and {'moe/experts', 'moe/starved' (experts
    whose statistics came from all tokens because too few were routed), 'moe/tokens_min', '..._max'};
    empty for a dense model."""
    experts: dict[str, dict[str, Any]] = {}
    for row in layers:
        if row.get("tokens") is not None:
            experts.setdefault(row["name"].rpartition(".")[0], {"tokens": row["tokens"], "stats_from": row["stats_from"]})
    if not experts:
        return {}, []
    rows = [{"expert": name, **v} for name, v in experts.items()]
    tokens = [r["tokens"] for r in rows]
    return {"moe/experts": float(len(rows)), "moe/starved": float(sum(r["stats_from"] == "all (starved)" for r in rows)),
            "moe/tokens_min": float(min(tokens)), "moe/tokens_max": float(max(tokens))}, rows


def compression_summary(model: nn.Module) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """({'sparsity', 'zero_fraction', 'avg_bits', 'fallbacks', ...}, per-layer rows) over every target Linear.

    `sparsity` is the pruned fraction, from the pruners' masks; `zero_fraction` counts every weight
    that is exactly 0 (pruned, or rounded to 0 by quantization). `nm_valid`: the mask is N:M and
    every pruned weight is 0. `fallbacks`: Linears whose OBS sweep fell back to the diagonal (no
    error propagation); `damp_raised`: Linears whose Hessian needed more damping than configured."""
    rows, counts = [], []
    for name, lin in adapter_for(model).named_linears(model):
        row, c = layer_summary(name, lin)
        rows.append(row)
        counts.append(c)
    return summarize(counts), rows


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Start the peak RSS over from now (Linux: VmHWM via /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gb() -> float | None:
    """VmHWM: the peak RSS since `reset_peak_rss` (or since start), GiB; None where unsupported."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def fault_in(module) -> None:
    """Read one element per 4 KiB page of every CPU parameter and buffer of `module`. A checkpoint
    that transformers maps lazily (safetensors) is then resident, so the RSS taken after loading counts
    the model (else its pages arrive during compression and look like the engine's memory)."""
    import torch

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and t.numel() and t.is_contiguous():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def current_rss_gb() -> float:
    """Resident set size of this process now (GiB, as peak_rss_gb)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    import transformers

    from . import __version__

    env = {
        "compresslab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "git_sha": _git_sha(), "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }
    return env


def environment() -> dict[str, Any]:
    """Versions, git sha, host and device: computed once per process (a sweep's jobs share it)."""
    return dict(_environment())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
