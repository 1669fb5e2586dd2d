"""End-to-end fine-tuning after compression, as the SLiM seed's fine_tune: the low-rank adapters
(or, when there are none, all unmasked weights) are trained with the causal-LM loss on calibration
text. Masks and quantization grids are kept with the same straight-through estimator as BEAM.

On several ranks (distributed.py) every rank draws the same batch and takes its share of it (samples
r, r + world, ...); its loss is weighted by its share of the batch and the gradients are summed over
the ranks before each step, so every rank takes the step one process would (to float-summation order)."""

from __future__ import annotations

import logging
import time

import torch
from torch.func import functional_call

from ..distributed import Ranks
from ..errors import ConfigError
from ..models.adapters import adapter_for
from .ste import ConstrainedLinear, frozen, make_optimizer

log = logging.getLogger(__name__)


class Finetune:
    """`recovery=finetune`: `steps`, `seqlen` (tokens per sample), `batch_size`, `lr` (1e-4),
    `optimizer` (adamw | adafactor), `seed`."""

    def __init__(self, steps: int = 50, seqlen: int = 512, batch_size: int = 2, lr: float = 1e-4,
                 optimizer: str = "adamw", seed: int = 0):
        if optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"recovery.optimizer={optimizer!r}: finetune uses adamw or adafactor")
        if steps < 0 or seqlen < 2 or batch_size < 1 or lr <= 0:
            raise ConfigError("recovery needs steps >= 0, seqlen >= 2, batch_size >= 1 and lr > 0")
        self.steps, self.seqlen, self.batch_size, self.lr, self.optimizer, self.seed = steps, seqlen, batch_size, lr, optimizer, seed

    data_parallel = True  # trains on several ranks (see the module doc)

    def finish_model(self, model, ids: torch.Tensor, device: torch.device | str | None = None, ranks=None) -> dict:
        """Train on `device` (the engine's; None: where the model is), then move the model back.
        `ranks`: the engine's, when several processes train together."""
        self._ranks = ranks if ranks is not None else Ranks()
        t0 = time.perf_counter()
        home = next(model.parameters()).device
        device = torch.device(device) if device is not None else home
        model.to(device)
        try:
            return self._train(model, ids, device, t0)
        finally:
            model.to(home)

    def _train(self, model, ids, device, t0) -> dict:
        linears = list(adapter_for(model).named_linears(model))  # (qualified name, Linear)
        has_adapters = any(getattr(lin, "lora_A", None) is not None for _, lin in linears)
        train = "adapters" if has_adapters else "all"
        cons = {f"{n}.": ConstrainedLinear(lin, train, False) for n, lin in linears}
        params = [p for c in cons.values() for p in c.parameters()]
        ids = ids[:, : self.seqlen].to(device)
        torch.manual_seed(self.seed)
        opt = make_optimizer(self.optimizer, params, self.lr)
        curve = []
        was_training = model.training
        model.train()
        try:
            with frozen(model), torch.enable_grad():
                ranks = self._ranks
                for step in range(self.steps):
                    idx = torch.randint(0, ids.shape[0], (self.batch_size,))  # the same on every rank
                    mine = idx[ranks.rank::ranks.world]  # this rank's share of the batch
                    opt.zero_grad(set_to_none=True)
                    loss = 0.0
                    if len(mine):
                        batch = ids[mine]
                        weights = {}
                        for name, c in cons.items():
                            weights.update(c.params(name))
                        out = functional_call(model, weights, (), {"input_ids": batch, "labels": batch, "use_cache": False},
                                              strict=False)
                        part = out.loss * (len(mine) / len(idx))  # summed over the ranks: the batch's mean loss
                        part.backward()
                        loss = float(part.detach())
                    ranks.all_reduce_grads(params)
                    opt.step()
                    curve.append(float(ranks.all_reduce_(torch.tensor([loss], dtype=torch.float64))[0]))
        finally:
            model.train(was_training)
        for c in cons.values():
            c.commit()
        return {"finetune_loss_first": curve[0] if curve else None, "finetune_loss_last": curve[-1] if curve else None,
                "curve": curve, "trained": train, "time_s": time.perf_counter() - t0}

    def __repr__(self):
        return f"Finetune(steps={self.steps}, lr={self.lr}, {self.optimizer})"
