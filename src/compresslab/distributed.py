"""One model compressed by several processes: torch.distributed ranks as a strategy of the one engine.

Launched by `torchrun --nproc-per-node N run.py ...` (or by `srun` / SLURM with several tasks and no
torchrun), every rank runs the same pipeline on the same model:

- data parallel calibration: rank r takes a contiguous share of the calibration samples
  (`shard`), runs the block forwards on it, and the statistics of each Linear group (Hessian sums,
  channel norms, JSQ sums, token counts; SliM-LLM's input samples gathered) are all-reduced in fp32
  before any stage reads them (`reduce`), so every rank decides on the statistics of all samples;
- weight parallel compression: the Linears of a group are assigned to ranks by cost (the OBS sweep's
  out·in² and the in³ factorization, longest first onto the least loaded rank); a Linear that alone
  outweighs a fair share is cut into blocks of rows when its stages allow it (`row_parallel`: GPTQ,
  N:M SparseGPT), `work`; each rank compresses its share and the owner broadcasts the result (weight,
  new parameters such as low-rank adapters, the layer's record, hooks a stage added: `share`), so every
  rank then holds the same compressed block and propagates its own share of the hidden states.

Only rank 0 writes (metrics.json, W&B, the checkpoint) and evaluates; the others log errors only.
A rank that fails leaves its error in the process group's store and exits; the others' pending
collective fails (the peer is gone) or, at worst, times out (`engine.dist_timeout_s`), and rank 0 records the
failing rank's error in metrics.json. Collectives run on the compute device's backend: `nccl` on CUDA, `gloo` on the CPU.

llm-compressor's data-parallel calibration with weight-parallel GPTQ (Llama-3-8B GPTQ in 264 s on
four GPUs against 745 s on one) is the design this follows.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
import threading
import time

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


def env_ranks(environ=None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, else from SLURM's (srun with several
    tasks); None in a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        return None
    return (rank, world, local) if world > 1 else None


def slurm_master(env) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT for a SLURM job without torchrun: the first node of the job, and a
    port derived from the job id (the tasks of one job agree on it; another job picks another)."""
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    first = nodes.split(",")[0]
    if "[" in first:  # node[01-04,07] -> node01
        stem, rest = first.split("[", 1)
        first = stem + rest.split("-")[0].split(",")[0].rstrip("]")
    port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return first, port


class Ranks:
    """One process: every collective is the identity (the engine calls them unconditionally)."""

    rank, world, local_rank = 0, 1, 0
    comm_s = 0.0  # seconds spent in collectives (waiting for the other ranks included)
    comm_bytes = 0  # bytes this rank sent or summed in collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        return slice(0, n)

    def reduce(self, stats) -> None:
        pass

    def work(self, items, stages) -> tuple[list, object]:
        """(the (name, Linear) this rank compresses, what `share` needs): here every Linear."""
        return items, None

    def share(self, items, plan, hooks_before) -> None:
        pass

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_counts(self, counts: list[int]) -> list[int]:
        return counts

    def all_reduce_grads(self, params) -> None:
        pass

    def offset(self, n_local: int) -> tuple[int, int]:
        return 0, n_local

    def agree(self, flag: bool) -> bool:
        return flag

    def gather(self, obj) -> list:
        return [obj]

    def fail(self, message: str) -> None:
        pass

    def peer_error(self) -> str | None:
        return None

    def summary(self, total_s: float) -> dict[str, float]:
        return {}

    def __repr__(self):
        return "Ranks(1)"


def _cost(lin: nn.Linear) -> float:
    """FLOPs of compressing one Linear by OBS: the column sweep (out · in²) and the factorization (in³)."""
    d_out, d_in = lin.weight.shape
    return float(d_out) * d_in * d_in + float(d_in) ** 3


def row_blocks(n_rows: int, parts: int) -> list[slice]:
    """`parts` contiguous blocks of n_rows rows, the first n_rows mod parts one row longer."""
    base, extra = divmod(n_rows, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (k < extra)
        out.append(slice(start, stop))
        start = stop
    return out


def _row_view(lin: nn.Linear, rows: slice) -> nn.Linear:
    """A Linear over rows of `lin` (its weight a view of them: what a stage writes lands in `lin`)."""
    view = nn.Linear(lin.in_features, rows.stop - rows.start, bias=lin.bias is not None, device="meta")
    view.weight = nn.Parameter(lin.weight.data[rows], requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        view.bias = nn.Parameter(lin.bias.data[rows], requires_grad=lin.bias.requires_grad)
    return view


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """Owner rank of each item: longest first onto the least loaded rank (ties: the lower rank)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[k] = r
        load[r] += costs[k]
    return owners


class Distributed(Ranks):
    """Several processes in one torch.distributed process group (see the module doc)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device
        self.comm_s, self.comm_bytes = 0.0, 0
        self._dist = dist
        self._store = dist.distributed_c10d._get_default_store()
        self._failing = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        """torchrun stops every rank (SIGTERM) once one has failed: this rank then unwinds as from an
        error, so that rank 0 still writes metrics.json with the failed rank's error; once this rank is
        failing already (writing its record), the signal is ignored: the process is ending anyway."""
        if not self._failing:
            raise SystemExit("SIGTERM: the launcher stopped this rank (another rank failed?)")

    # -- data parallel -------------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """Rank r's contiguous share of n samples (the first n mod world ranks take one more)."""
        if n < self.world:
            raise ConfigError(f"{n} calibration samples cannot be split over {self.world} ranks: use data.nsamples >= "
                              f"{self.world} or fewer ranks")
        return row_blocks(n, self.world)[self.rank]

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.comm_s += time.perf_counter() - t0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (on the collective backend's device)."""
        self.comm_bytes += t.numel() * t.element_size()
        if t.device.type == "cuda" or self._dist.get_backend() == "gloo":
            self._timed(self._dist.all_reduce, t)
            return t
        moved = t.to(self.device)
        self._timed(self._dist.all_reduce, moved)
        return t.copy_(moved)

    def sum_counts(self, counts: list[int]) -> list[int]:
        """Integer counts (tokens per expert) summed over the ranks."""
        t = torch.tensor(counts, dtype=torch.int64, device=self._coll_device())
        return self.all_reduce_(t).tolist()

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients of `params` over the ranks (a missing one counts as zero), in one buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not grads:
            return
        flat = self.all_reduce_(torch.cat([g.reshape(-1).float() for g in grads]))
        at = 0
        for p, g in zip(params, grads):
            p.grad = flat[at:at + g.numel()].view_as(g).to(g.dtype)
            at += g.numel()

    def offset(self, n_local: int) -> tuple[int, int]:
        """(the first global index of this rank's n_local samples, the global count): the ranks hold
        contiguous shares in rank order (`shard`)."""
        counts = self.gather(int(n_local))
        return sum(counts[:self.rank]), sum(counts)

    def agree(self, flag: bool) -> bool:
        """True when `flag` is true on every rank."""
        return self.sum_counts([int(bool(flag))])[0] == self.world

    def gather(self, obj) -> list:
        out = [None] * self.world
        self._timed(self._dist.all_gather_object, out, obj)
        return out

    def reduce(self, stats) -> None:
        """Every rank's LayerStats summed: the statistics of all calibration samples (stats.py). The
        sums travel in fp32 as they were accumulated; the counts as int64."""
        if stats is None:
            return
        if stats._hessian is not None:  # the accumulator became H (stats.py): summing it now would be wrong
            raise RuntimeError("Ranks.reduce after the Hessian was read: reduce the statistics first")
        sums = [t for t in (stats._xtx, stats._sq, stats._abs, stats._jsq_sq) if t is not None]
        if stats._jsq:  # (T, d): every rank saw sequences of the same length
            if stats._jsq_seq is None:
                raise RuntimeError(f"rank {self.rank} observed no input for a group the others did")
            sums.append(stats._jsq_seq)
        for t in sums:
            self.all_reduce_(t)
        counts = torch.tensor([stats.n, stats.samples], dtype=torch.float64, device=self._coll_device())
        self.all_reduce_(counts)
        stats.n, stats.samples = int(counts[0]), int(counts[1])
        if stats._sample is not None:  # SliM-LLM's input sample: every rank's rows, in rank order
            rows = self.gather([t.cpu() for t in stats._sample])
            stats._sample = [t.to(self.device) for part in rows for t in part]

    def _coll_device(self) -> torch.device:
        return self.device if self._dist.get_backend() == "nccl" else torch.device("cpu")

    # -- weight parallel -----------------------------------------------------------------------------
    def work(self, items, stages) -> tuple[list, list]:
        """Split a group's work: a Linear that alone costs more than a fair share (1/world of the group)
        is cut into `world` blocks of rows when every stage allows it (`row_parallel`: rows that never
        interact, e.g. GPTQ, N:M SparseGPT; each block still factors H), then the units go to ranks by
        cost. Returns ((name, Linear or row view) this rank compresses, the plan for `share`)."""
        costs = [_cost(lin) for _, lin in items]
        units = []  # (item index, rows or None, the Linear or a view of its rows)
        for k, (_, lin) in enumerate(items):
            splits = (costs[k] > sum(costs) / self.world and lin.weight.shape[0] >= 2 * self.world
                      and all(getattr(s, "row_parallel", lambda _: False)(lin) for s in stages))
            if splits:
                units += [(k, r, _row_view(lin, r)) for r in row_blocks(lin.weight.shape[0], self.world)]
            else:
                units.append((k, None, lin))
        owners = assign_by_cost([_cost(layer) for _, _, layer in units], self.world)
        plan = [(k, rows, owner, layer) for (k, rows, layer), owner in zip(units, owners)]
        mine = [(items[k][0], layer) for k, _, owner, layer in plan if owner == self.rank]
        return mine, plan

    def share(self, items, plan, hooks_before) -> None:
        """After each rank compressed its units: every unit's result from its owner to all; a Linear
        compressed as row blocks takes their rows and their records stacked (LayerState.take_rows).
        `hooks_before`: per Linear, the keys of its forward (pre-)hooks before the stages ran."""
        blocks: dict[int, list] = {}
        for k, rows, owner, layer in plan:
            before = hooks_before[k] if rows is None else (set(), set())
            payload = [_snapshot(layer, before) if owner == self.rank else None]
            if owner == self.rank:
                self.comm_bytes += sum(t.numel() * t.element_size() for t, _ in payload[0]["params"].values())
            self._timed(self._dist.broadcast_object_list, payload, src=owner)
            if rows is None:
                if owner != self.rank:
                    _restore(items[k][1], payload[0])
            else:
                blocks.setdefault(k, []).append((rows, payload[0]))
        for k, parts in blocks.items():
            _take_rows(items[k][1], parts)

    def summary(self, total_s: float) -> dict[str, float]:
        """dist/world_size and every rank's compute and communication seconds and bytes (a collective:
        every rank calls it once, at the end of the engine's run)."""
        rows = self.gather((total_s - self.comm_s, self.comm_s, self.comm_bytes))
        out = {"dist/world_size": float(self.world)}
        for r, (compute, comm, nbytes) in enumerate(rows):
            out.update({f"dist/rank{r}/compute_s": compute, f"dist/rank{r}/comm_s": comm,
                        f"dist/rank{r}/comm_gb": nbytes / 1e9})
        return out

    # -- failures ------------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """This rank failed: leave its error in the store for rank 0. The process then ends, which closes
        its connections: the other ranks' pending collective fails at once (instead of timing out), and
        rank 0 records this error (see `_on_sigterm` for a launcher that stops the ranks meanwhile)."""
        self._failing = True
        try:
            self._store.set(f"compresslab/error/{self.rank}", message)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0
            pass

    def peer_error(self) -> str | None:
        """The first error another rank left in the store, as 'rank r: ...', else None."""
        for r in range(self.world):
            key = f"compresslab/error/{r}"
            try:
                if r != self.rank and self._store.check([key]):
                    return f"rank {r}: {self._store.get(key).decode()}"
            except Exception:  # noqa: BLE001 - the store is gone
                return None
        return None

    def __repr__(self):
        return f"Distributed(rank {self.rank} of {self.world}, {self._dist.get_backend()})"


def _snapshot(lin: nn.Module, hooks_before: tuple[set, set]) -> dict:
    """What compressing `lin` left on it: parameters and buffers (CPU copies), its record (without the
    dense weights each rank keeps itself) and the hooks a stage added."""
    from .stages import STATE_ATTR

    state = lin.__dict__.get(STATE_ATTR)
    if state is not None:
        state = dataclasses.replace(state, original=None, dense=None)
    pre, post = hooks_before
    return {
        "params": {n: (p.detach().cpu(), p.requires_grad) for n, p in lin._parameters.items() if p is not None},
        "buffers": {n: b.detach().cpu() for n, b in lin._buffers.items() if b is not None},
        "state": state,
        "pre_hooks": [fn for key, fn in lin._forward_pre_hooks.items() if key not in pre],
        "hooks": [fn for key, fn in lin._forward_hooks.items() if key not in post],
    }


@torch.no_grad()
def _restore(lin: nn.Module, snap: dict) -> None:
    from .stages import STATE_ATTR

    device = lin.weight.device
    for name, (t, grad) in snap["params"].items():
        p = lin._parameters.get(name)
        if p is not None and p.shape == t.shape and p.dtype == t.dtype:
            p.copy_(t.to(device))
            p.requires_grad_(grad)
        else:
            lin._parameters[name] = nn.Parameter(t.to(device), requires_grad=grad)
    for name, t in snap["buffers"].items():
        lin._buffers[name] = t.to(device)
    if snap["state"] is not None:
        mine = lin.__dict__.get(STATE_ATTR)
        keep = {"original": mine.original, "dense": mine.dense} if mine is not None else {}
        lin.__dict__[STATE_ATTR] = dataclasses.replace(snap["state"], **keep)
    for fn in snap["pre_hooks"]:
        lin.register_forward_pre_hook(fn)
    for fn in snap["hooks"]:
        lin.register_forward_hook(fn)


@torch.no_grad()
def _take_rows(lin: nn.Linear, parts: list) -> None:
    """`lin` as its row blocks were compressed: their rows, their records stacked, a stage's hooks once."""
    from .stages import layer_state

    for rows, snap in parts:
        lin.weight[rows] = snap["params"]["weight"][0].to(lin.weight.device, lin.weight.dtype)
        if lin.bias is not None and "bias" in snap["params"]:
            lin.bias[rows] = snap["params"]["bias"][0].to(lin.bias.device, lin.bias.dtype)
    states = [snap["state"] for _, snap in parts]
    if all(st is not None for st in states):
        layer_state(lin, create=True).take_rows(states)
    first = parts[0][1]
    for fn in first["pre_hooks"]:
        lin.register_forward_pre_hook(fn)
    for fn in first["hooks"]:
        lin.register_forward_hook(fn)


def init_ranks(device: torch.device, timeout_s: float = 1800.0) -> Ranks:
    """The ranks of this process: a `Distributed` when launched with several (torchrun or SLURM),
    joining (or reusing) the default process group; else the single-process `Ranks`."""
    import torch.distributed as dist

    found = env_ranks()
    if found is None:
        return Ranks()
    rank, world, local = found
    if not dist.is_available():
        raise ConfigError("this torch has no torch.distributed; run one process (no torchrun / one SLURM task)")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most one "
                              "process per GPU (torchrun --nproc-per-node <GPUs>)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun
            addr, port = slurm_master(os.environ)
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
        if rank == 0:  # the other ranks say nothing but errors
            log.info("%d ranks (%s), one model: data-parallel calibration, weight-parallel compression", world, backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), local, device)
