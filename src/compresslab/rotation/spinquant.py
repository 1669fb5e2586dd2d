"""SpinQuant (Liu et al. 2024, "SpinQuant: LLM Quantization with Learned Rotations"): R1 (residual)
and R2 (per-block values) learned on the Stiefel manifold to minimise the language-model loss of the
fake-quantised model, starting from QuaRot's randomised Hadamard; R4 stays an online Hadamard.

Training (`learn`): weights W(R) = the rotated weights (rotation/base.py), fake-quantised with
round-to-nearest at `bits` / `group_size` through a straight-through estimator; Linear inputs
fake-quantised per token at `act_bits` (straight-through); loss = next-token cross-entropy on
calibration windows. Update: Cayley SGD (Li et al. 2020, "Efficient Riemannian Optimization on the
Stiefel Manifold via the Cayley Transform"), for orthogonal R with Euclidean gradient G:
    A = G Rᵀ − R Gᵀ (skew-symmetric),  R ← (I + η/2 A)⁻¹ (I − η/2 A) R,
which keeps R orthogonal. The paper: 100 iterations, 800 WikiText-2 samples of 2048 tokens,
lr 1.5, batch 8 on 8 GPUs; here `iters`, `batch_size` and the calibration windows scale it for CPU time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import adapter_for
from ..quantizer import grid as _grid
from ..quantizer.activations import ActQuant
from ..utils import get_module
from .base import _head_dim, as_orthogonal, layout
from .quarot import QuaRot

log = logging.getLogger(__name__)
FILE = "spinquant.safetensors"


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step (Li et al. 2020, as SpinQuant runs it) for (..., n, n) orthogonal R with
    Euclidean gradient G: the skew-symmetric A = ½(G Rᵀ − R Gᵀ) (the Riemannian gradient's generator for
    square R), step α = min(lr, 1/‖A‖₁) per matrix, R ← (I + α/2 A)⁻¹ (I − α/2 A) R."""
    A = 0.5 * (G @ R.transpose(-1, -2) - R @ G.transpose(-1, -2))
    norm1 = A.abs().sum(-2).amax(-1)  # max column sum
    alpha = torch.clamp(1.0 / (norm1 + 1e-8), max=lr)[..., None, None]
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve(eye + alpha / 2 * A, (eye - alpha / 2 * A) @ R)


def nearest_orthogonal(R: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to R (polar factor U Vᵀ), float64: removes float drift."""
    U, _, Vh = torch.linalg.svd(R.double())
    return U @ Vh


def rtn_ste(W: torch.Tensor, bits: int, group_size: int, grid: str = "asym") -> torch.Tensor:
    """W fake-quantised to nearest on `grid` (per row, or per group of inputs), gradient straight through."""
    Wd = W.detach().float()
    view, _ = _grid.group_reshape(Wd, group_size, "row")
    scale, zero = _grid.qparams(view.amin(-1, keepdim=True), view.amax(-1, keepdim=True), bits, grid)
    q = _grid.fake_quantize(view, scale, zero, _grid.max_code(bits, grid)).reshape(W.shape).to(W.dtype)
    return W + (q - W.detach())


class SpinQuant(QuaRot):
    """Args:
        seed, online_down: as QuaRot (the start is QuaRot's randomised Hadamard with this seed).
        bits, group_size, grid: the weights' fake quantization during training (round to nearest).
        act_bits: activations during training, as the quantizer's `act_bits` (8: FP8 per tensor, fewer:
            int per token); null: weights only.
        iters: Cayley SGD steps (paper: 100). lr: its step size (paper: 1.5). momentum: heavy ball.
        batch_size: calibration windows per step (the pipeline's data; cycled).
        path: a file this class saved (spinquant.safetensors): its R1/R2 are applied, nothing is learned.
    """

    def __init__(self, seed: int = 0, online_down: bool = True, bits: int = 4, group_size: int = -1,
                 grid: str = "asym", act_bits: int | None = None, iters: int = 100, lr: float = 1.5,
                 momentum: float = 0.0, batch_size: int = 1, path: str | None = None):
        super().__init__(seed, True, online_down)
        _grid.check_bits(bits)
        _grid.check_grid(grid, key="rotation.grid")
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ConfigError(f"rotation.group_size must be -1 (per row) or a positive int, got {group_size!r}")
        self.act = None
        if act_bits is not None:
            try:
                self.act = ActQuant(act_bits)
            except ConfigError as e:
                raise ConfigError(str(e).replace("quantizer.", "rotation.")) from e
        if not isinstance(iters, int) or iters < 0:
            raise ConfigError(f"rotation.iters must be an int >= 0, got {iters!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"rotation.batch_size must be an int >= 1, got {batch_size!r}")
        if not lr > 0 or not 0 <= momentum < 1:
            raise ConfigError(f"rotation.lr must be > 0 and rotation.momentum in [0, 1), got {lr!r}, {momentum!r}")
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"rotation.path={path!r} is not a file; pass the {FILE} a SpinQuant run saved "
                              "in its output folder, or leave it null to learn the rotation")
        self.bits, self.group_size, self.grid, self.act_bits = bits, group_size, grid, act_bits
        self.iters, self.lr, self.momentum, self.batch_size, self.path = iters, lr, momentum, batch_size, path

    @property
    def needs_calibration(self) -> bool:
        return self.path is None and self.iters > 0

    @property
    def data_parallel(self) -> bool:  # learning runs in one process; a saved rotation loads on every rank
        return not self.needs_calibration

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if self.group_size > 0:
            for name, lin in adapter_for(model).named_linears(model):
                _grid.check_group_size(f"rotation: {name}", lin.in_features, self.group_size)

    def matrices(self, model, calibration=None, output_dir=None):
        if self.path is not None:
            return self._load(model)
        R1, R2 = super().matrices(model)
        if self.iters > 0:
            if calibration is None:
                raise ConfigError("rotation=spinquant learns from calibration windows; set data=calibration")
            R1, R2 = self.learn(model, R1, R2, calibration)
        if output_dir is not None:
            self._save(Path(output_dir) / FILE, R1, R2)
        return R1, R2

    # -- learning --------------------------------------------------------------------------------
    def learn(self, model: nn.Module, R1: torch.Tensor, R2: list[torch.Tensor], calibration: torch.Tensor):
        """Cayley SGD on (R1, R2) from the given start; returns them orthogonal, float64."""
        lay, adapter = layout(model), adapter_for(model)
        dev = next(model.parameters()).device
        blocks = adapter.block_list(model)
        d = _head_dim(model)
        block_linears = [(f"{adapter.blocks}.{i}.{n}", lin) for i, b in enumerate(blocks)
                         for g in adapter.linear_groups(b) for n, lin in g]
        W0 = {n: p.detach() for n, p in model.named_parameters()}
        r1 = as_orthogonal(R1).matrix().float().to(dev).requires_grad_(True)
        r2 = torch.stack([as_orthogonal(r).matrix().float() for r in R2]).to(dev).requires_grad_(True)
        m1, m2 = torch.zeros_like(r1), torch.zeros_like(r2)
        # the embeddings and the head are not quantized: rotate their activations instead of their
        # (vocab, hidden) weights, e ← e R1 after the embedding and x ← x R1ᵀ before the head
        hooks = [get_module(model, lay.embed).register_forward_hook(lambda _m, _a, out: out @ r1.to(out.dtype)),
                 get_module(model, lay.head).register_forward_pre_hook(
                     lambda _m, a: (a[0] @ r1.T.to(a[0].dtype), *a[1:]))]
        if self.act is not None:
            def act(m, args):  # the quantizer's activation rounding, gradient straight through
                x = args[0]
                return (x + (self.act(m, (x.detach(),))[0] - x.detach()), *args[1:])

            hooks += [lin.register_forward_pre_hook(act) for _, lin in block_linears]
        grads = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        ids = calibration.to(dev)
        losses = []
        try:
            for step in range(self.iters):
                rows = torch.arange(step * self.batch_size, (step + 1) * self.batch_size) % ids.shape[0]
                batch = ids[rows.to(ids.device)]
                params = self._rotated(model, lay, adapter, W0, r1, r2, d, block_linears)
                out = torch.func.functional_call(model, params, (batch,), {"labels": batch, "use_cache": False})
                loss = out.loss
                g1, g2 = torch.autograd.grad(loss, (r1, r2))
                with torch.no_grad():
                    m1.mul_(self.momentum).add_(g1)
                    m2.mul_(self.momentum).add_(g2)
                    r1.copy_(cayley_step(r1, m1, self.lr))
                    r2.copy_(cayley_step(r2, m2, self.lr))
                losses.append(float(loss.detach()))
                if step == 0 or (step + 1) % 10 == 0 or step + 1 == self.iters:
                    log.info("spinquant step %d/%d: loss %.4f", step + 1, self.iters, losses[-1])
        finally:
            for h in hooks:
                h.remove()
            for p, g in grads.items():
                p.requires_grad_(g)
        k = max(1, min(10, len(losses) // 4))  # the first and last steps' mean (one batch each: noisy)
        self.report = {"rotation/loss_first": sum(losses[:k]) / k, "rotation/loss_last": sum(losses[-k:]) / k,
                       "rotation/iters": float(self.iters)}
        self.curve = losses
        return nearest_orthogonal(r1.detach()), [nearest_orthogonal(r) for r in r2.detach()]

    def _rotated(self, model, lay, adapter, W0, r1, r2, d, block_linears) -> dict[str, torch.Tensor]:
        """Every parameter the rotation changes, as functions of (r1, r2); block Linears fake-quantised."""
        P = {}  # (the embeddings and the head: hooks in `learn`)
        readers = {n for _, rs in lay.norms for n in rs}
        v_name, o_name = lay.values
        dt = next(iter(W0.values())).dtype  # the model's (bf16 on a GPU): the rotations cast into it, in the graph
        r1, r2 = r1.to(dt), r2.to(dt)
        for i, _ in enumerate(adapter.block_list(model)):
            pre = f"{adapter.blocks}.{i}."
            for n in readers:
                W = W0[pre + n + ".weight"] @ r1
                if n == v_name:  # each KV head's rows: Rᵀ W_h
                    W = torch.einsum("de,hdk->hek", r2[i], W.reshape(-1, d, W.shape[-1])).reshape(W.shape)
                    if pre + n + ".bias" in W0:
                        P[pre + n + ".bias"] = (W0[pre + n + ".bias"].reshape(-1, d) @ r2[i]).reshape(-1)
                P[pre + n + ".weight"] = W
            for n in lay.writers:
                W = r1.T @ W0[pre + n + ".weight"]
                if n == o_name:  # each head's columns: W_:,h R
                    W = (W.reshape(W.shape[0], -1, d) @ r2[i]).reshape(W.shape)
                P[pre + n + ".weight"] = W
                if pre + n + ".bias" in W0:
                    P[pre + n + ".bias"] = W0[pre + n + ".bias"] @ r1
        for name, lin in block_linears:
            key = name + ".weight"
            P[key] = rtn_ste(P.get(key, W0[key]), self.bits, self.group_size, self.grid)
        return P

    # -- saved rotations -------------------------------------------------------------------------
    def _save(self, path: Path, R1, R2) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        R1, R2 = as_orthogonal(R1).matrix(), torch.stack([as_orthogonal(r).matrix() for r in R2])
        save_file({"R1": R1.contiguous(), "R2": R2.contiguous()}, str(path),
                  metadata={"format": "compresslab-spinquant", "seed": str(self.seed),
                            "online_down": str(self.online_down)})
        log.info("spinquant: rotation saved to %s (reuse it with rotation.path=%s)", path, path)

    def _load(self, model):
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "compresslab-spinquant" or set(f.keys()) != {"R1", "R2"}:
                raise ConfigError(f"rotation.path={self.path} is not a rotation SpinQuant saved ({FILE})")
            R1, R2 = f.get_tensor("R1"), f.get_tensor("R2")
        lay = layout(model)
        hidden = get_module(model, lay.embed).weight.shape[1]
        blocks = len(adapter_for(model).block_list(model))
        d = _head_dim(model)
        if tuple(R1.shape) != (hidden, hidden) or tuple(R2.shape) != (blocks, d, d):
            raise ConfigError(f"rotation.path={self.path} holds R1 {tuple(R1.shape)}, R2 {tuple(R2.shape)}; this "
                              f"model needs ({hidden}, {hidden}) and ({blocks}, {d}, {d}): it was learned for "
                              "another model")
        if meta.get("online_down") is not None and meta["online_down"] != str(self.online_down):
            raise ConfigError(f"rotation.path={self.path} was learned with online_down={meta['online_down']}; "
                              f"set rotation.online_down={meta['online_down'].lower()}")
        return R1, list(R2)
