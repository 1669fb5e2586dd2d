"""The Optimal Brain Surgeon column sweep shared by GPTQ and SparseGPT, as one pure function.

Columns of W (out, in) are processed left to right in blocks. Each column is pruned and/or
rounded, and its error, scaled by the inverse Hessian, is pushed onto the columns not yet
processed (lazy batch updates outside the block). Pruning and quantization then happen in ONE
pass over the Hessian, as in SparseGPT's joint mode.

- GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", ICLR 2023 (Alg. 1; Cholesky form of H⁻¹, act-order, static groups).
- SparseGPT: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", ICML 2023 (adaptive mask per block by w²/[H⁻¹]_jj², N:M per group of M columns).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .quantizer import grid
from .quantizer.format import QuantizedWeight

log = logging.getLogger(__name__)
MIN_RETRY_DAMP = 1e-4  # the first retry's percdamp when the configured one is 0


@dataclass
class GridSpec:
    bits: int
    group_size: int = -1  # -1: one range per output row
    grid: str = "asym"  # asym | sym | absmax (quantizer/grid.py)
    static_groups: bool = False  # group ranges fixed from W before the sweep (needed with act_order)
    bit_map: torch.Tensor | None = None  # (in/group_size,) bits per input group (mixed precision)
    # Optional range search: fn(Wg (out, k), salience (out, k), bits) -> (scale, zero), each (out,).
    params: Callable | None = None

    def group_bits(self, j: int) -> int:
        return int(self.bit_map[j]) if self.bit_map is not None else self.bits

    def group_maxq(self, j: int) -> int:
        return grid.max_code(self.group_bits(j), self.grid)


@dataclass
class PruneSpec:
    sparsity: float
    nm: tuple[int, int] | None = None


@dataclass
class Numerics:
    """What the factorization of one Linear's Hessian needed: the damping finally used (percdamp
    units), and whether every retry failed so the diagonal was used (no error propagation: in
    effect round-to-nearest). Stages copy it into the layer's state; metrics.json reports it."""

    damp: float
    fallback: bool = False
    retries: int = 0


def inverse_hessian_upper(H: torch.Tensor, percdamp: float, retries: int = 3, name: str = "",
                          numerics: list | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H), so that U[i, i:] is
    the row GPTQ needs. When the factorization fails, λ grows ×10 (from 1e-4 when it was 0) up to
    `retries` times; if all fail, the diagonal inverse is used (no error propagation: RTN with OBS
    saliences). What was needed is appended to `numerics` (a Numerics)."""
    d = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).clamp_min(1e-12)
    damp = percdamp
    eye = torch.eye(d, device=H.device, dtype=H.dtype)
    for attempt in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Cholesky succeeded with percdamp=%g after %d retries", name, damp, attempt)
                if numerics is not None:
                    numerics.append(Numerics(damp, False, attempt))
                return U
        if attempt < retries:
            nxt = damp * 10 if damp > 0 else MIN_RETRY_DAMP  # percdamp=0 would stay 0 when multiplied
            log.warning("%s: Cholesky failed with percdamp=%g; retrying with %g", name, damp, nxt)
            damp = nxt
    log.error("%s: Cholesky failed %d times; falling back to the diagonal (no error propagation)", name, retries + 1)
    if numerics is not None:
        numerics.append(Numerics(damp, True, retries))
    return torch.diag(1.0 / torch.sqrt(torch.diag(H).clamp_min(0) + damp * mean_diag))


def prepare_hessian(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with dead columns' diagonal set to 1, the dead mask): a column no input ever reached has
    H_jj = 0, which no damping relative to mean(diag H) can make factorizable on its own."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def hinv_chol_diag(H: torch.Tensor, percdamp: float, name: str = "", numerics: list | None = None) -> torch.Tensor:
    """diag(U), U the upper Cholesky factor of (H + λI)⁻¹ (dead columns set to 1 first), with the
    same damping retries as the sweep: the [H⁻¹]_jj of the OBS saliences w²/[H⁻¹]_jj² as GPTQ,
    SparseGPT and the SliM-LLM reference compute them (the diagonal of the Cholesky factor, not of
    the inverse itself)."""
    return torch.diag(inverse_hessian_upper(prepare_hessian(H)[0], percdamp, name=name, numerics=numerics))


def _group_params(Wg: torch.Tensor, spec: GridSpec, j: int, dU: torch.Tensor | None = None):
    """(out,) scale and zero of input group j, whose columns are Wg (out, k): the min/max grid,
    or the spec's range search given the OBS salience w²/[H⁻¹]_jj²."""
    bits = spec.group_bits(j)
    if spec.params is not None:
        sal = Wg.square() / (dU.square()[None, :] if dU is not None else 1.0)
        return spec.params(Wg, sal, bits)
    return grid.qparams(Wg.amin(1), Wg.amax(1), bits, spec.grid)


@torch.no_grad()
def obs_compress(W: torch.Tensor, H: torch.Tensor, *, quant: GridSpec | None = None,
                 prune: PruneSpec | None = None, keep: torch.Tensor | None = None,
                 act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                 name: str = "", numerics: list | None = None,
                 latent: list | None = None) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor]:
    """Prune and/or quantize W (out, in) against the input Hessian H (in, in).

    Args:
        quant: the integer grid, or None for no quantization.
        prune: sparsity to reach (mask chosen adaptively), or None.
        keep: a fixed boolean keep-mask (out, in) to hold (e.g. from an earlier pruner).
        act_order: process columns by decreasing H_jj (needs static groups when grouped).
        numerics: a list to which the factorization's Numerics (damping used, fallback) is appended.
        latent: a list to which the pre-rounding weights (out, in) are appended: each column as the
            error feedback left it just before it was rounded (q + err·U_ii), masked.
    Returns:
        (W_hat (out, in) float32, QuantizedWeight or None, keep-mask (out, in) bool).
    """
    W = W.detach().float().clone()  # (out, in)
    H, dead = prepare_hessian(H)  # (in, in)
    out, d = W.shape
    W[:, dead] = 0.0
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.clone().bool()
    W.mul_(keep)
    fixed = prune is None  # the mask only changes when pruning

    g = quant.group_size if quant is not None and quant.group_size > 0 else d
    nm = prune.nm if prune is not None else None
    if nm is not None and act_order:
        raise ValueError("act_order cannot be combined with N:M pruning (N:M groups are contiguous columns)")
    unit = math.lcm(g if g < d else 1, nm[1] if nm else 1)
    blocksize = max(unit, blocksize // unit * unit)  # groups never straddle a block
    ngroups = d // g
    scales = torch.empty(out, ngroups, device=W.device)
    zeros = torch.empty(out, ngroups, device=W.device)
    if quant is not None and (quant.static_groups or g == d):
        # Ranges fixed from the (masked) weight in its original column order.
        dH = hinv_chol_diag(H, percdamp, name) if quant.params is not None else None
        for j in range(ngroups):
            cols = slice(j * g, (j + 1) * g)
            scales[:, j], zeros[:, j] = _group_params(W[:, cols], quant, j, dH[cols] if dH is not None else None)
    dynamic = quant is not None and not (quant.static_groups or g == d)
    if act_order and dynamic:
        raise ValueError("act_order with groups needs static_groups (groups must stay contiguous)")

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d, device=W.device)
    W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    group_of = perm // g  # group of each processed column, in the original order
    U = inverse_hessian_upper(H, percdamp, name=name, numerics=numerics)  # (d, d)
    del H

    pre = torch.empty_like(W) if latent is not None else None
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        W1 = W[:, i1:i2].clone()  # (out, b)
        U1 = U[i1:i2, i1:i2]  # (b, b)
        dU = torch.diag(U1)  # (b,)
        E1 = torch.zeros_like(W1)
        K1 = keep[:, i1:i2]
        if not fixed and nm is None and prune.sparsity > 0:
            score = W1.square() / dU.square()  # OBS saliency w²/[H⁻¹]_jj²
            k = int(score.numel() * prune.sparsity)
            if k > 0:
                thresh = score.flatten().kthvalue(k).values
                K1 &= score > thresh
        chosen = set()  # N:M groups of this block whose mask is already chosen

        def choose_nm(j):  # adaptive N:M mask for columns j..j+M of the block, from the current W1
            n, m = nm
            j -= j % m
            if j in chosen or j >= i2 - i1:
                return
            chosen.add(j)
            score = W1[:, j:j + m].square() / dU[j:j + m].square()  # (out, M)
            drop = score.topk(m - n, dim=1, largest=False).indices
            K1[:, j:j + m].scatter_(1, drop, False)

        for i in range(i2 - i1):
            col = i1 + i
            if not fixed and nm is not None:
                choose_nm(i)
            w = W1[:, i] * K1[:, i]
            if quant is not None:
                if dynamic and col % g == 0:
                    if nm is not None and not fixed:  # the group's masks first, so its range sees survivors
                        for j in range(i, min(i + g, i2 - i1), nm[1]):
                            choose_nm(j)
                    scales[:, col // g], zeros[:, col // g] = _group_params(
                        W1[:, i:i + g] * K1[:, i:i + g], quant, col // g, dU[i:i + g])
                gi = int(group_of[col])
                s, z = scales[:, gi], zeros[:, gi]
                q = grid.fake_quantize(w, s, z, quant.group_maxq(gi)) * K1[:, i]
            else:
                q = w
            err = (W1[:, i] - q) / dU[i]  # (out,)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        if pre is not None:  # w_pre = q + err·U_ii, column by column, without a per-column copy
            pre[:, i1:i2] = W1 + E1 * dU[None, :]
        if i2 < d:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)

    inv = torch.argsort(perm)
    W, keep = W[:, inv], keep[:, inv]
    if pre is not None:
        latent.append(pre[:, inv] * keep)
    qw = None
    if quant is not None:
        qw = QuantizedWeight(None, scales, zeros, quant.bits, g, quant.grid, (out, d),
                             quant.bit_map.clone().to(torch.uint8) if quant.bit_map is not None else None).encode(W)
    return W, qw, keep
