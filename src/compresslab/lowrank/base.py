"""Shared low-rank maths and glue.

Every method here is a *whitened* truncated SVD of the compression error E = W − C(W) (out, in):
pick an input-side transform T (in, in), take the SVD of E·T = UΣVᵀ, keep rank r, and map back:

    E ≈ B·A,   B = U_r (out, r),   A = Σ_r V_rᵀ T⁻¹ (r, in),   y = C(W)x + B(Ax).

In the SLiM seed's notation L = Aᵀ (in, r) and R = Bᵀ (r, out), so that W ≈ C(W) + (LR)ᵀ. The
methods differ only in T: identity (naive SVD), diag(√mean x²) (SLiM-LoRA), diag(mean|x|)
(L2QER), Q√Λ from XXᵀ = QΛQᵀ (EoRA), the Cholesky factor of XXᵀ (SVD-LLM), diag(mean|x|)^α
(ASVD). Whitening by a factor of XXᵀ makes the truncation optimal for the output error ‖EX‖.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..stages import layer_state
from ..pruner.masks import keep_mask

ADAPTER_TILE = 128  # SLiM seed: adapters quantized with group AbsMax over tiles of 128


@dataclass
class AdapterInfo:
    rank: int
    quantized_bits: int | None  # 4 when the adapters were fake-quantized, else None (fp16)
    pruned: bool  # A holds 2:4 sparsity
    replaces: bool  # C(W) = 0: the adapters ARE the layer (low-rank as compression)


def whitened_svd(E: torch.Tensor, r: int, T: torch.Tensor | None = None, T_inv: torch.Tensor | None = None):
    """(B (out, r), A (r, in)) with B·A ≈ E, truncation optimal in the norm ‖E·T‖_F.

    T may be None (identity), a vector (diagonal transform) or a matrix with its inverse."""
    E = E.float()
    if T is None:
        M = E
    elif T.dim() == 1:
        M = E * T[None, :]
    else:
        M = E @ T
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # M = U diag(S) Vh
    B = U[:, :r]
    A = S[:r, None] * Vh[:r]  # (r, in)
    if T is not None:
        A = A / T[None, :] if T.dim() == 1 else A @ T_inv
    return B.contiguous(), A.contiguous()


def resolve_rank(rank: int | None, rank_ratio: float | None, out: int, inp: int, pad_to: int | None,
                 param_ratio: float | None = None) -> int:
    if param_ratio is not None:  # r·(out + in) = param_ratio·out·in
        r = max(1, int(param_ratio * out * inp / (out + inp)))
    else:
        r = rank if rank is not None else max(1, round(rank_ratio * min(out, inp)))
    if pad_to:
        r = math.ceil(r / pad_to) * pad_to
    return min(r, min(out, inp))


def absmax_codes(T: torch.Tensor, bits: int = 4, tile: int = ADAPTER_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric AbsMax quantization per tile of `tile` consecutive elements along dim 1:
    (integer codes in [-(2^(b-1)-1), 2^(b-1)-1] (rows, cols) as float, scales (rows, tiles))."""
    rows, cols = T.shape
    g = min(tile, cols)
    pad = (-cols) % g
    Tp = F.pad(T.float(), (0, pad)).reshape(rows, -1, g)
    qmax = 2 ** (bits - 1) - 1
    scale = Tp.abs().amax(-1).clamp_min(1e-12) / qmax  # (rows, tiles)
    codes = torch.round(Tp / scale[..., None]).clamp(-qmax, qmax).reshape(rows, -1)[:, :cols]
    return codes, scale


def absmax_fake_quant(T: torch.Tensor, bits: int = 4, tile: int = ADAPTER_TILE) -> torch.Tensor:
    """T on its AbsMax grid (see absmax_codes)."""
    codes, scale = absmax_codes(T, bits, tile)
    g = min(tile, T.shape[1])
    return (codes * scale.repeat_interleave(g, dim=1)[:, : T.shape[1]]).to(T.dtype)


def refit_B(E: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor | None, iters: int, lr: float = 1e-3):
    """Adam refit of B after A changed (pruned), minimizing ‖(E − BA)X‖² (through H when given)."""
    B = B.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([B], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            D = E - B @ A
            loss = ((D @ H) * D).sum() if H is not None else D.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return B.detach()


def _adapter_forward(module, args, output):
    return output + F.linear(F.linear(args[0], module.lora_A), module.lora_B)


def attach(layer: nn.Linear, B: torch.Tensor, A: torch.Tensor, info: AdapterInfo) -> None:
    """Keep the adapters as parameters of the Linear: y = Wx (+ bias) + B(Ax) via a forward hook."""
    dtype = layer.weight.dtype
    layer.lora_A = nn.Parameter(A.to(dtype), requires_grad=False)
    layer.lora_B = nn.Parameter(B.to(dtype), requires_grad=False)
    state = layer_state(layer, create=True)
    if state.adapter is None:
        layer.register_forward_hook(_adapter_forward)
    state.adapter = info


class LowRank:
    """Base of `lowrank=...` stages. Subclasses define `transform(W, E, stats) -> (T, T_inv)`.

    Args:
        rank / rank_ratio: adapter rank, or a fraction of min(d_in, d_out) (0.1, the SLiM seed's).
        separate: keep B·A as a separate low-rank path; false merges it into the weight, which
            is only allowed when nothing is quantized (a merged weight is off the grid).
        quantize_adapters: group AbsMax 4-bit over tiles of 128, as in the SLiM seed.
        prune_adapters: 2:4 on A (the seed's L), then `prune_iters` Adam steps refit B.
        pad_rank_to: round the rank up to a multiple (8 or 128) for kernels.
        param_ratio: instead of a rank, the fraction of the layer's parameters the factors may
            use (low-rank as compression: 0.8 is a 20% parameter cut).
    """

    needs: frozenset[str] = frozenset()
    uses_original = True  # the engine keeps the dense weight while the layer's stages run

    def __init__(self, rank: int | None = None, rank_ratio: float | None = 0.1, separate: bool = True,
                 quantize_adapters: bool = False, prune_adapters: bool = False, prune_iters: int = 100,
                 pad_rank_to: int | None = None, param_ratio: float | None = None):
        if param_ratio is not None and not 0 < param_ratio <= 1:
            raise ConfigError(f"lowrank.param_ratio={param_ratio} must be in (0, 1]")
        if rank is None and rank_ratio is None and param_ratio is None:
            raise ConfigError("set lowrank.rank or lowrank.rank_ratio")
        if rank is not None and rank < 1:
            raise ConfigError(f"lowrank.rank={rank} must be >= 1")
        if rank is None and rank_ratio is not None and not 0 < rank_ratio <= 1:
            raise ConfigError(f"lowrank.rank_ratio={rank_ratio} must be in (0, 1]")
        if pad_rank_to not in (None, 0, 8, 16, 32, 64, 128):
            raise ConfigError(f"lowrank.pad_rank_to={pad_rank_to}: use null, 8, 16, 32, 64 or 128")
        if not separate and quantize_adapters:
            raise ConfigError("lowrank.separate=false merges B·A into the weight, so the adapters cannot be "
                              "quantized on their own; use separate=true with quantize_adapters")
        self.rank, self.rank_ratio, self.separate = rank, rank_ratio, separate
        self.quantize_adapters, self.prune_adapters, self.prune_iters = quantize_adapters, prune_adapters, prune_iters
        self.pad_rank_to = pad_rank_to or None
        self.param_ratio = param_ratio

    def check_level(self, key: str, value) -> None:
        """An allocation's per-layer `rank` (allocation/)."""
        if key != "rank":
            return
        if self.param_ratio is not None:
            raise ConfigError("lowrank.param_ratio sets every layer's rank; unset it to allocate ranks per layer")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"an allocated rank must be an int >= 1, got {value!r}")

    def check_after(self, previous: list) -> None:
        """A merged B·A (separate=false) is dense and off any grid: it would undo a pruner's mask and
        a quantizer's grid, so it only makes sense as the one stage (low-rank as compression)."""
        if not self.separate and previous:
            names = " + ".join(type(s).__name__ for s in previous)
            raise ConfigError(f"lowrank.separate=false merges B·A into the weight {names} produced; the dense, "
                              "off-grid sum would undo its pruning mask and quantization grid. Use "
                              "lowrank.separate=true after a pruner or quantizer")

    def check(self, name: str, layer: nn.Module) -> None:
        if self.prune_adapters and layer.in_features % 4:
            raise ConfigError(f"lowrank.prune_adapters=true prunes A 2:4 along the input width, but {name} has "
                              f"{layer.in_features} inputs (not a multiple of 4)")

    def layer_rank(self, out: int, inp: int) -> int:
        """This layer's rank, from rank / rank_ratio / param_ratio (an allocation sets `rank` per layer)."""
        return resolve_rank(self.rank, self.rank_ratio, out, inp, self.pad_rank_to, self.param_ratio)

    def transform(self, W: torch.Tensor, E: torch.Tensor, stats):
        raise NotImplementedError

    def factor(self, W: torch.Tensor, E: torch.Tensor, stats, r: int, numerics: list | None = None, name: str = ""):
        """(B, A) of rank r for the Linear `name`; a method that factorizes XXᵀ appends its obs.Numerics
        to `numerics`."""
        T, T_inv = self.transform(W, E, stats)
        return whitened_svd(E, r, T, T_inv)

    @torch.no_grad()
    def compress(self, name: str, layer: nn.Linear, stats=None) -> None:
        state = layer_state(layer, create=True)
        W = state.original if state.original is not None else layer.weight.detach().float()
        compressed = state.compressed
        if not self.separate and compressed:
            raise ConfigError(f"lowrank.separate=false would merge B·A into the pruned or quantized weight of "
                              f"{name} (filling pruned positions, moving it off the grid); use lowrank.separate=true")
        C = layer.weight.detach().float() if compressed else torch.zeros_like(W)
        E = W - C  # (out, in)
        r = self.layer_rank(*W.shape)
        B, A = self.factor(W, E, stats, r, state.numerics, name=name)
        H = stats.hessian if stats is not None and stats.has_hessian else None
        if self.prune_adapters:
            A = A * keep_mask(A.abs(), 0.5, (2, 4))
            B = refit_B(E, A, B, H, self.prune_iters)
        if self.quantize_adapters:
            A, B = absmax_fake_quant(A), absmax_fake_quant(B)
        self.after_factor(name, layer, W, E, B, A, stats)
        info = AdapterInfo(r, 4 if self.quantize_adapters else None, self.prune_adapters, not compressed)
        if not self.separate or not compressed:  # merge: dense W' = C + BA (C = 0 for low-rank-only)
            layer.weight.data.copy_((C + B @ A).to(layer.weight.dtype))
            if compressed:
                return
            state.adapter = info  # low-rank as compression: the layer is stored as its factors
            state.factors = (B.to(torch.float16), A.to(torch.float16))
            return
        attach(layer, B, A, info)

    def after_factor(self, name, layer, W, E, B, A, stats):
        """Hook for methods that change C(W) once the (final) adapters are known (SLiM re-quantization)."""

    def __repr__(self):
        r = f"rank={self.rank}" if self.rank is not None else f"rank_ratio={self.rank_ratio}"
        return f"{type(self).__name__}({r}, separate={self.separate}, q={self.quantize_adapters}, p={self.prune_adapters})"
