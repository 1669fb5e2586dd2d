"""BEAM: block-wise error minimization after one-shot compression (the BEAM seed's recovery).

For each group of `block_granularity` consecutive blocks, the compressed group is trained so that
its output matches the dense group's output (MSE), then the next group follows. Only the current
group and its dense copy are on the device.

- mode=offline: inputs and targets both come from the dense model (a dense stream is carried along).
- mode=online: inputs come from the already-recovered compressed model; targets are the dense
  group applied to those same inputs.

Unlike the seed, quantized weights stay on their grid (straight-through fake quantization with
frozen scales and zeros, optionally trainable scales) and masks stay fixed; a learning rate grid is
searched by the loss on held-out calibration windows (`val_fraction`), not by training loss.

On several ranks (distributed.py) each rank holds a contiguous share of the calibration windows and
computes its targets; training is data parallel: every step takes the same global batch (one
permutation of the whole set, the same seed everywhere), each rank the loss of its windows in it
divided by the global batch's size, and the gradients are summed over the ranks before the step, so
the ranks train the same weights as one process would (to float-summation order); losses and the
held-out split are over the whole set.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Ranks
from ..errors import ConfigError
from .ste import OPTIMIZERS, constrained, frozen, make_optimizer

log = logging.getLogger(__name__)
LR_GRID = (1e-3, 5e-4, 1e-4, 5e-5, 1e-6)


class Beam:
    """`recovery=beam`.

    Args:
        mode: offline | online.
        block_granularity: consecutive blocks trained together.
        optimizer: adam | adamw | sgd | adafactor. epochs, lr, batch_size, seed.
        lr_search: pick lr from `lr_grid` by held-out loss (the last `val_fraction` of the windows).
        train: all (weights + adapters) | adapters | scales. train_scales: also learn the scales.
        checkpoint_dir: save each finished group; a rerun with the same directory resumes.
    """

    def __init__(self, mode: str = "online", block_granularity: int = 1, optimizer: str = "adam", epochs: int = 2,
                 lr: float = 1e-3, batch_size: int = 8, seed: int = 0, lr_search: bool = False,
                 lr_grid=LR_GRID, val_fraction: float = 0.125, train: str = "all", train_scales: bool = False,
                 checkpoint_dir: str | None = None):
        if mode not in ("offline", "online"):
            raise ConfigError(f"unknown recovery.mode={mode!r}; use offline or online")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown recovery.optimizer={optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if block_granularity < 1 or epochs < 0 or lr <= 0 or batch_size < 1:
            raise ConfigError("recovery needs block_granularity >= 1, epochs >= 0, lr > 0 and batch_size >= 1")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"recovery.val_fraction={val_fraction} must be in [0, 1)")
        if not lr_grid or any(v <= 0 for v in lr_grid):
            raise ConfigError(f"recovery.lr_grid={list(lr_grid)} must be non-empty with every lr > 0")
        if lr_search and val_fraction == 0:
            raise ConfigError("recovery.lr_search picks by held-out loss: set recovery.val_fraction > 0")
        self.mode, self.granularity, self.optimizer, self.epochs = mode, block_granularity, optimizer, epochs
        self.lr, self.batch_size, self.seed, self.lr_search = lr, batch_size, seed, lr_search
        self.lr_grid, self.val_fraction, self.train, self.train_scales = tuple(lr_grid), val_fraction, train, train_scales
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._ranks = Ranks()  # one process, or the engine's ranks (`begin`)
        self._reset()

    data_parallel = True  # trains on several ranks (see the module doc)

    def _reset(self):
        self._group: list[tuple[nn.Module, nn.Module]] = []  # (dense, compressed) blocks of the current group
        self._group_in = None  # compressed-stream input of the group
        self._dense_in = None  # dense-stream input of the group (offline)
        self._dense_stream = None
        self._index = -1

    def begin(self, num_blocks: int, ranks=None) -> None:
        self._reset()
        self._num_blocks = num_blocks
        self._ranks = ranks if ranks is not None else Ranks()

    # -- engine hook -----------------------------------------------------------------------------
    def recover(self, dense: nn.Module, compressed: nn.Module, inputs: torch.Tensor, forward) -> dict:
        self._index += 1
        if not self._group:
            self._group_in = inputs
            if self.mode == "offline":
                self._dense_in = inputs if self._dense_stream is None else self._dense_stream
        self._group.append((dense, compressed))
        last = (self._index + 1) % self.granularity == 0 or self._index + 1 == getattr(self, "_num_blocks", math.inf)
        if not last:
            return {"deferred": True}
        group, self._group = self._group, []
        x = self._group_in if self.mode == "online" else self._dense_in
        with torch.no_grad():
            target = self._run(forward, [d for d, _ in group], x)
            if self.mode == "offline":
                self._dense_stream = target  # the next group's dense input
        first = self._index - len(group) + 1
        return self._train_or_resume(forward, group, x, target, first)  # the engine propagates the group

    # -- training ----------------------------------------------------------------------------------
    def _run(self, forward, blocks, x, params=None):
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            h = x[i:i + self.batch_size]
            for j, b in enumerate(blocks):
                h = forward(b, h, params[j] if params else None)
            outs.append(h)
        return torch.cat(outs)

    def _split(self, n):
        n_val = int(round(n * self.val_fraction))
        n_val = min(max(n_val, 1 if self.val_fraction > 0 else 0), n - 1)
        return n - n_val  # windows [0, n_train) train, the rest validate

    def _loss(self, forward, blocks, cons, x, target) -> float:
        """MSE over the windows of every rank (each rank holds its own `x`, possibly none)."""
        with torch.no_grad():
            params = [self._params(c) for c in cons]
            sq = 0.0
            if x.shape[0]:
                y = self._run(forward, blocks, x, params)
                sq = float(F.mse_loss(y.float(), target.float(), reduction="sum"))
            sums = self._ranks.all_reduce_(torch.tensor([sq, float(target.numel())], dtype=torch.float64))
            return float(sums[0] / sums[1])

    @staticmethod
    def _params(c):
        out = {}
        for prefix, cl in c.items():
            out.update(cl.params(prefix))
        return out

    def _fit(self, forward, blocks, x, target, lr, n_train, start=0):
        """Train on the global windows [0, n_train); this rank holds windows [start, start + len(x))."""
        torch.manual_seed(self.seed)
        cons = [constrained(b, self.train, self.train_scales) for b in blocks]
        params = [p for c in cons for cl in c.values() for p in cl.parameters()]
        curve = []
        if not params or self.epochs == 0:
            return cons, curve
        opt = make_optimizer(self.optimizer, params, lr)
        steps = self.epochs * math.ceil(n_train / self.batch_size)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.01, total_iters=max(steps, 1))
        per_window = target[0].numel() if target.shape[0] else 0
        with frozen(*blocks), torch.enable_grad():
            for _ in range(self.epochs):
                perm = torch.randperm(n_train)  # the whole set's windows: the same on every rank
                total = 0.0
                for i in range(0, n_train, self.batch_size):
                    idx = perm[i:i + self.batch_size]
                    mine = idx[(idx >= start) & (idx < start + x.shape[0])] - start  # this rank's windows of the batch
                    opt.zero_grad(set_to_none=True)
                    if len(mine):
                        h = x[mine]
                        for b, c in zip(blocks, cons):
                            h = forward(b, h, self._params(c))
                        # this rank's part of the batch's mean: summed over the ranks it is the batch's MSE
                        loss = F.mse_loss(h.float(), target[mine].float(), reduction="sum") / (len(idx) * per_window)
                        loss.backward()
                        total += float(loss.detach()) * len(idx)
                    self._ranks.all_reduce_grads(params)
                    opt.step()
                    sched.step()
                curve.append(float(self._ranks.all_reduce_(torch.tensor([total], dtype=torch.float64))[0]) / n_train)
        return cons, curve

    def _train_or_resume(self, forward, group, x, target, first) -> dict:
        blocks = [c for _, c in group]
        name = f"blocks_{first}_{first + len(group) - 1}"
        saved = self.checkpoint_dir is not None and (self.checkpoint_dir / f"{name}.json").is_file()
        if self._ranks.agree(saved):  # every rank resumes, or none does
            self._load(blocks, name)
            return {"resumed": True, **json.loads((self.checkpoint_dir / f"{name}.json").read_text())}
        start, n = self._ranks.offset(x.shape[0])  # this rank's windows [start, start + len(x)) of n
        n_train = self._split(n) if self.val_fraction > 0 else n
        lo, hi = (n_train, n) if n_train < n else (0, n)  # the held-out windows, of the whole set
        val = slice(min(max(lo - start, 0), x.shape[0]), min(max(hi - start, 0), x.shape[0]))
        before = self._loss(forward, blocks, [constrained(b, self.train, self.train_scales) for b in blocks],
                            x[val], target[val])
        snapshot = [copy.deepcopy(b.state_dict()) for b in blocks] if self.lr_search else None
        best, lr_losses = None, []
        for lr in (self.lr_grid if self.lr_search else (self.lr,)):
            if snapshot is not None:
                for b, sd in zip(blocks, snapshot):
                    b.load_state_dict(sd)
            cons, curve = self._fit(forward, blocks, x, target, lr, n_train, start)
            val_loss = self._loss(forward, blocks, cons, x[val], target[val])
            lr_losses.append([lr, val_loss])
            if best is None or val_loss < best[0]:
                best = (val_loss, lr, cons, curve)
        trained, lr, cons, curve = best
        kept = "trained" if trained <= before else "oneshot"
        if kept == "oneshot":  # training made it worse on held-out data: keep the one-shot weights
            log.warning("%s: held-out loss rose (%.4g -> %.4g); keeping the one-shot weights", name, before, trained)
            if snapshot is not None:
                for b, sd in zip(blocks, snapshot):
                    b.load_state_dict(sd)
        else:
            for c in cons:
                for cl in c.values():
                    cl.commit()
        # loss_trained: held-out loss of the trained weights, whether or not they were kept;
        # loss_after: of the weights the block now has (loss_before when the one-shot ones were kept)
        report = {"loss_before": before, "loss_trained": trained, "loss_after": trained if kept == "trained" else before,
                  "kept": kept, "lr": lr, "lr_losses": lr_losses, "curve": curve, "mode": self.mode}
        if self.checkpoint_dir is not None and self._ranks.is_main:  # the same weights on every rank
            self._save(blocks, name, report)
        return report

    def _save(self, blocks, name, report):
        from safetensors.torch import save_file

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"{j}.{k}": v.detach().contiguous().cpu() for j, b in enumerate(blocks) for k, v in b.state_dict().items()}
        save_file(tensors, str(self.checkpoint_dir / f"{name}.safetensors"))
        (self.checkpoint_dir / f"{name}.json").write_text(json.dumps(report))  # written last: marks the group done

    def _load(self, blocks, name):
        from safetensors.torch import load_file

        tensors = load_file(str(self.checkpoint_dir / f"{name}.safetensors"))
        for j, b in enumerate(blocks):
            sd = {k[len(f"{j}."):]: v for k, v in tensors.items() if k.startswith(f"{j}.")}
            b.load_state_dict(sd)

    def __repr__(self):
        return f"Beam({self.mode}, granularity={self.granularity}, {self.optimizer}, epochs={self.epochs}, lr={self.lr})"
