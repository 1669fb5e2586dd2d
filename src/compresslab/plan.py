"""Memory planning: how the engine goes through a block within a memory budget.

The engine holds the calibration hidden states entering and leaving the current block, the block's
intermediates while it runs, and each group's statistics. `make_plan` estimates that working set
from the model config and the calibration shape (nothing is allocated) and picks the fastest way
through a block that fits the budget:

- one pass: the whole calibration batch in one forward (calibration, true-sequential order and
  propagation at once);
- chunks of k samples: per Linear group a forward over the chunks up to the group, then one
  propagation. On a Llama block the residual h and o_proj's input are kept (the attention runs once
  per chunk) and, when the budget also holds down_proj's (N, T, I) input, that too, so that every
  Linear runs once per sample as in one pass (`keep_mlp_input`); without it gate/up run twice;
- on an accelerator, hidden states on the host (pinned) when even they do not fit beside the block,
  moved to the device chunk by chunk.

The estimate is per token of the block's widest moment, in units the reader can check
(C hidden, I intermediate, q = heads x head_dim, kv = kv_heads x head_dim, b bytes per activation):

    attention:  (2C + 5q + 4kv) b        input, norm; q, rotated q (+ its temporary), output, k/v expanded
                                         to q heads; k, v, rotated k
    MLP:        (3C + m I) b             input, residual, norm; m (tokens, I) tensors: 3 as HF writes it, 1 with
                                         the adapter's lean MLP (2 when a hook, e.g. activation quantization, sees up's input)
    eager attention adds 2 H T b         (scores and probabilities; SDPA does not hold them)

plus the lean MLP's two row-slice temporaries (2 x LEAN_ROWS x I b), and, per plan: the hidden states in and out (2 N T C b, or only the first on the host),
down_proj's kept input (N T I b, chunks with `keep_mlp_input`), the
statistics of the widest group, fp32: 2 d² (H and the factorization's one (d, d) matrix, which each
LAPACK step overwrites) + 9 rows x d (the dense originals, the stacked weight, the sweep's
working copy, masks as floats, the codes' float buffer), over the groups q/k/v, o, gate/up, down; a dense copy of
the block when a recovery or block-level stage needs one, and a block-wise recovery's training set
(its batch through the block with autograd, and Adam's two states per parameter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .models import adapters

AUTO_FRACTION = 0.85  # `max_memory=auto`: this much of the free memory of the compute device


def human(nbytes: float) -> str:
    """'1.40 GB', '350 MB', '12 kB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} B"


def parse_memory(value, what: str = "engine.max_memory") -> int | str | None:
    """Bytes of a memory setting ('40GB', '1.5GB', '800MB', an int), 'auto', or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    from .checkpoint.io import parse_size

    try:
        return parse_size(value)
    except ConfigError:
        raise ConfigError(f"{what}={value!r} is not a memory size; use e.g. 40GB, 1.5GB, 800MB, auto or null") from None


def free_memory(device: torch.device) -> int | None:
    """Free bytes of `device` now: CUDA's free memory, or MemAvailable of /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a model config."""

    hidden: int
    intermediate: int
    q: int  # heads x head_dim
    kv: int  # kv heads x head_dim
    heads: int
    block_params: int
    eager: bool

    @classmethod
    def of(cls, config) -> "Shape":
        c = config.hidden_size
        inter = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * c)
        heads = config.num_attention_heads
        hd = getattr(config, "head_dim", None) or c // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        q, kv = heads * hd, kv_heads * hd
        params = c * (q + 2 * kv) + q * c + 3 * c * inter + 2 * c  # q/k/v, o, gate/up/down, two norms
        eager = getattr(config, "_attn_implementation", None) == "eager"
        return cls(c, inter, q, kv, heads, params, eager)


@dataclass(frozen=True)
class Plan:
    chunk_size: int | None  # None: one pass
    est_bytes: int
    budget: int | None
    hidden_on_host: bool = False
    keep_mlp_input: bool = False  # chunks: down_proj's input kept for all samples (gate/up run once)
    reuse_freed: bool = False  # the host allocator keeps freed blocks for the next op (hostmem.py)

    def describe(self) -> str:
        how = "one pass" if self.chunk_size is None else f"chunks of {self.chunk_size}"
        host = ", hidden states on the host" if self.hidden_on_host else ""
        host += ", the MLP's down input kept" if self.keep_mlp_input else ""
        host += ", freed memory reused" if self.reuse_freed else ""
        budget = f" (budget {human(self.budget)})" if self.budget else ""
        return f"plan: {how}{host}, est. {human(self.est_bytes)}{budget}"


def estimate(shape: Shape, n: int, t: int, chunk: int | None, *, act_bytes: int = 4, param_bytes: int = 4,
             mlp_copies: int = 1, hessian: bool = True, dense_copy: bool = False, block_on_device: bool = False,
             train_batch: int = 0, hidden_on_host: bool = False, keep_mlp_input: bool = False) -> int:
    """Bytes the engine holds above the loaded model at a block's widest moment (see the module doc)."""
    c, b = shape.hidden, act_bytes
    attn = 2 * c + 5 * shape.q + 4 * shape.kv + (2 * shape.heads * t if shape.eager else 0)
    mlp = 3 * c + mlp_copies * shape.intermediate
    per_token = max(attn, mlp) * b
    tokens = n * t if chunk is None else min(chunk, n) * t
    if chunk is None:  # one pass: the block's input is part of its widest moment
        total = n * t * per_token
    else:  # chunks: the whole stream in and out, one chunk's intermediates
        stream = (0 if hidden_on_host else 2) * n * t * c * b
        total = stream + tokens * (per_token - c * b) + (n * t * shape.intermediate * b if keep_mlp_input else 0)
    if mlp_copies < 3 and mlp >= attn:  # the lean MLP's row slices: the activation's and up's outputs
        total += 2 * min(tokens, adapters.LEAN_ROWS) * shape.intermediate * b
    if hessian:  # the widest group's statistics and sweep (rows = its stacked outputs, d = its inputs)
        groups = ((shape.q + 2 * shape.kv, c), (c, shape.q), (2 * shape.intermediate, c), (c, shape.intermediate))
        total += 4 * max(2 * d * d + 9 * rows * d for rows, d in groups)
    block = shape.block_params * param_bytes
    total += block * (int(dense_copy) + int(block_on_device))
    if train_batch:  # autograd keeps ~every intermediate of its batch; Adam two states per parameter
        total += 2 * train_batch * t * (attn + mlp) * b + 3 * block + n * t * c * b  # + the targets
    return int(total)


def make_plan(config, n: int, t: int, *, budget: int | None, chunk_size: int | None | str = "auto",
              device: torch.device = torch.device("cpu"), mlp_writer: bool = False, **kw) -> Plan:
    """The fastest plan that fits `budget` bytes (None: no limit). An int `chunk_size` or None (one
    pass) is taken as given and only estimated. `mlp_writer`: the blocks let the chunked path keep
    down_proj's input (adapter data `residual_mlp_out`); chunks that keep it come first (each Linear
    then runs once per sample), the largest that fits."""
    shape = Shape.of(config)
    if chunk_size != "auto":
        chunk = None if chunk_size is None or chunk_size >= n else int(chunk_size)
        if chunk is not None and mlp_writer:
            kept = estimate(shape, n, t, chunk, keep_mlp_input=True, **kw)
            if budget is None or kept <= budget:
                return Plan(chunk, kept, budget, keep_mlp_input=True)
        return Plan(chunk, estimate(shape, n, t, chunk, **kw), budget)
    one = estimate(shape, n, t, None, **kw)
    if budget is None or one <= budget:
        return Plan(None, one, budget)
    for host in ((False, True) if device.type != "cpu" else (False,)):
        for keep in ((True, False) if mlp_writer and not host else (False,)):
            fixed = estimate(shape, n, t, 0, hidden_on_host=host, keep_mlp_input=keep, **kw)
            per = estimate(shape, n, t, 1, hidden_on_host=host, keep_mlp_input=keep, **kw) - fixed
            k = min(n, (budget - fixed) // per) if budget > fixed else 0
            if k >= 1:
                est = estimate(shape, n, t, int(k), hidden_on_host=host, keep_mlp_input=keep, **kw)
                return Plan(int(k), est, budget, host, keep)
    need = estimate(shape, n, t, 1, hidden_on_host=device.type != "cpu", **kw)
    raise ConfigError(
        f"engine.max_memory={human(budget)} is less than one calibration sample needs beside the hidden "
        f"states ({human(need)} for {n}x{t}): raise engine.max_memory, or lower data.nsamples / data.seqlen")


def with_reuse(plan: Plan, device: torch.device, max_memory, streamed: bool) -> Plan:
    """`plan` with `reuse_freed` decided: the host allocator keeps freed blocks (hostmem.py: a CPU forward
    over the calibration batch then stops faulting in fresh pages for every op) when the compute device is
    the CPU, the model is not streamed from disk (a run whose point is a small footprint), the user set no
    byte budget (engine.max_memory auto or null: a number means memory comes first), and the budget holds
    the estimate twice over (room for the blocks kept and the heap's fragmentation)."""
    reuse = (device.type == "cpu" and not streamed and parse_memory(max_memory) in ("auto", None)
             and (plan.budget is None or 2 * plan.est_bytes <= plan.budget))
    return dataclasses.replace(plan, reuse_freed=reuse)


def resolve_budget(max_memory, device: torch.device) -> int | None:
    """engine.max_memory as bytes: 'auto' is AUTO_FRACTION of the device's free memory now."""
    value = parse_memory(max_memory)
    if value == "auto":
        free = free_memory(device)
        return None if free is None else int(free * AUTO_FRACTION)
    return value
