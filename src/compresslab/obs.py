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

from .pruner.masks import nm_drop
from .quantizer import grid
from .quantizer.format import QuantizedWeight
from .stages import layer_state, row_slices

log = logging.getLogger(__name__)
MIN_RETRY_DAMP = 1e-4  # the first retry's percdamp when the configured one is 0


@dataclass
class GridSpec:
    bits: int
    group_size: int = -1  # -1: one range per output row
    grid: str = "asym"  # asym | sym | absmax (quantizer/grid.py)
    static_groups: bool = False  # group ranges fixed from W before the sweep (needed with act_order)
    # (in/group_size,) bits per input group (mixed precision), or (out, in/group_size): a map per row,
    # for Linears with different maps stacked in one sweep
    bit_map: torch.Tensor | None = None
    # Optional range search: fn(Wg (out, k), salience (out, k), bits) -> (scale, zero), each (out,).
    params: Callable | None = None
    # SpQR: each group's scales (and asym zeros) quantized again to `stat_bits` on a min/max grid per
    # `stat_group` consecutive output rows (quantizer/grid.quantize_stat); None: fp16 scales, integer zeros
    stat_bits: int | None = None
    stat_group: int = 16

    def group_bits(self, j: int) -> int | torch.Tensor:
        """Bits of input group j: an int, or (out,) float per row for a per-row map."""
        if self.bit_map is None:
            return self.bits
        return int(self.bit_map[j]) if self.bit_map.dim() == 1 else self.bit_map[:, j].float()

    def group_maxq(self, j: int) -> int | torch.Tensor:
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


def _all_finite(A: torch.Tensor, rows: int | None = None) -> bool:
    """torch.isfinite(A).all() a slice of rows at a time (default: about 2¹⁶ elements, so the slices'
    temporaries are negligible): the one-shot form holds |A| and three bool masks of A's size at once
    (1.75 (d, d) fp32 matrices at the factorization's widest moment)."""
    rows = rows or max(1, (1 << 16) // max(1, A.shape[-1]))
    return all(bool(torch.isfinite(A[i:i + rows]).all()) for i in range(0, A.shape[0], rows))


def inverse_hessian_upper(H: torch.Tensor, percdamp: float, retries: int = 3, name: str = "",
                          numerics: list | None = None, dead: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H), so that U[i, i:] is
    the row GPTQ needs. When the factorization fails, λ grows ×10 (from 1e-4 when it was 0) up to
    `retries` times; if all fail, the diagonal inverse is used (no error propagation: RTN with OBS
    saliences). What was needed is appended to `numerics` (a Numerics). `dead` (d,) bool: columns
    no input ever reached (H_jj = 0, which no damping relative to mean(diag H) can make factorizable
    on its own); their diagonal counts as 1, in the working copy (H itself is never copied for it)."""
    diag = torch.diag(H) if dead is None else torch.diag(H).masked_fill(dead, 1.0)
    mean_diag = torch.mean(diag).clamp_min(1e-12)
    damp = percdamp
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(retries + 1):
        # ONE (d, d) matrix of ours beside H (d = 11008: 0.5 GB in fp32): every LAPACK step overwrites it.
        # F is the clone's column-major view (LAPACK's layout, so `out=` is written in place, no temporary;
        # its values are the clone's, H being symmetric): the same calls on the same values as
        # cholesky -> cholesky_inverse -> cholesky(upper) into new tensors, bitwise (tests/test_obs.py)
        F = H.clone().mT
        if dead is not None:
            F.diagonal().masked_fill_(dead, 1.0)
        F.diagonal().add_(damp * mean_diag)  # H + λI
        torch.linalg.cholesky_ex(F, out=(F, info))  # lower triangle: L, L Lᵀ = H + λI
        if info == 0:
            torch.cholesky_inverse(F, out=F)  # (H + λI)⁻¹, both triangles
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))  # U, UᵀU = (H + λI)⁻¹
            U = F
            if info == 0 and _all_finite(U):
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
    return torch.diag(1.0 / torch.sqrt(diag.clamp_min(0) + damp * mean_diag))


def hinv_chol_diag(H: torch.Tensor, percdamp: float, name: str = "", numerics: list | None = None) -> torch.Tensor:
    """diag(U), U the upper Cholesky factor of (H + λI)⁻¹ (dead columns' diagonal set to 1 first), with the
    same damping retries as the sweep: the [H⁻¹]_jj of the OBS saliences w²/[H⁻¹]_jj² as GPTQ,
    SparseGPT and the SliM-LLM reference compute them (the diagonal of the Cholesky factor, not of
    the inverse itself)."""
    H = H.detach().float()
    return torch.diag(inverse_hessian_upper(H, percdamp, name=name, numerics=numerics, dead=torch.diag(H) == 0))


SUB_BLOCK = 32  # columns per inner lazy-update block (see obs_compress)


def _sub_block(blocksize: int, group: int | None, nm: tuple[int, int] | None) -> int:
    """Columns per inner block: SUB_BLOCK when group starts (dynamic ranges) and N:M groups align
    with inner-block starts, else the whole block (one level of lazy updates, as in GPTQ)."""
    sub = SUB_BLOCK
    if (group is not None and group % sub) or (nm is not None and sub % nm[1]) or blocksize <= sub:
        return blocksize
    return sub


def fused_block_sweep(W: torch.Tensor, quant: "GridSpec | None", fixed: bool, act_order: bool, tau=None):
    """The fused Triton block sweep (compresslab.kernels.obs_block) when W is on a GPU and the case
    is GPTQ's own: quantization with a fixed mask, the min/max grid, contiguous groups (no outliers, no
    quantized statistics); else None."""
    if not (W.is_cuda and fixed and quant is not None and quant.params is None and not act_order
            and tau is None and quant.stat_bits is None
            and (quant.bit_map is None or quant.bit_map.dim() == 1)):
        return None
    from .kernels import obs_block

    return obs_block.gptq_block_triton if obs_block.triton is not None else None


def _group_params(Wg: torch.Tensor, spec: GridSpec, j: int, dU: torch.Tensor | None = None, tau: float | None = None):
    """(out,) scale and zero of input group j, whose columns are Wg (out, k): the min/max grid, the
    spec's range search given the OBS salience w²/[H⁻¹]_jj², or (with an outlier threshold tau) SpQR's
    leave-one-out fit that leaves likely outliers out of the range."""
    bits = spec.group_bits(j)
    if spec.params is not None:
        sal = Wg.square() / (dU.square()[None, :] if dU is not None else 1.0)
        return spec.params(Wg, sal, bits)
    if tau is not None and Wg.shape[1] > 1:
        return grid.loo_qparams(Wg, dU, bits, spec.grid, tau)
    return grid.qparams(Wg.amin(1), Wg.amax(1), bits, spec.grid)


class _Stats:
    """SpQR's quantized statistics: each group's (out,) scales and zeros through `grid.quantize_stat`,
    their codes and chunk parameters kept for the packed checkpoint (QuantizedWeight.stat)."""

    def __init__(self, spec: GridSpec, out: int, ngroups: int, device):
        self.spec, self.parts = spec, {}
        n = -(-out // spec.stat_group)
        for k in ("scales",) + (("zeros",) if spec.grid == "asym" else ()):
            self.parts[k] = (torch.zeros(out, ngroups, dtype=torch.uint8, device=device),
                             torch.zeros(n, ngroups, device=device), torch.zeros(n, ngroups, device=device))

    def __call__(self, j: int, scale: torch.Tensor, zero: torch.Tensor):
        out = []
        for k, v in (("scales", scale), ("zeros", zero)):
            if k not in self.parts:
                out.append(v)
                continue
            vals, codes, step, low = grid.quantize_stat(v, self.spec.stat_bits, self.spec.stat_group)
            c, st, lo = self.parts[k]
            c[:, j], st[:, j], lo[:, j] = codes, step, low
            out.append(vals.clamp_min(2**-24) if k == "scales" else vals)
        return out[0], out[1]

    def record(self) -> dict:
        return {"bits": self.spec.stat_bits, "group": self.spec.stat_group, **self.parts}


@torch.no_grad()
def obs_compress(W: torch.Tensor, H: torch.Tensor, *, quant: GridSpec | None = None,
                 prune: PruneSpec | None = None, keep: torch.Tensor | None = None,
                 act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                 name: str = "", numerics: list | None = None, latent: list | None = None,
                 segments: list[int] | None = None, outlier_threshold: float | None = None,
                 outliers: list | None = None, overwrite: bool = False
                 ) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor]:
    """Prune and/or quantize W (out, in) against the input Hessian H (in, in).

    Args:
        quant: the integer grid, or None for no quantization.
        prune: sparsity to reach (mask chosen adaptively), or None.
        keep: a fixed boolean keep-mask (out, in) to hold (e.g. from an earlier pruner).
        act_order: process columns by decreasing H_jj (needs static groups when grouped).
        numerics: a list to which the factorization's Numerics (damping used, fallback) is appended.
        latent: a list to which the pre-rounding weights (out, in) are appended: each column as the
            error feedback left it just before it was rounded (q + err·U_ii), masked.
        segments: row counts of several Linears stacked in W (they share H): one sweep for all of
            them. Rows never interact in the sweep; only the unstructured pruning threshold is
            taken per segment, so the result is that of separate sweeps.
        outlier_threshold: SpQR's unstructured outliers (Dettmers et al., "SpQR: A Sparse-Quantized
            Representation for Near-Lossless LLM Weight Compression", 2023): a weight whose OBS error
            (w − q(w))² / [U]_jj² exceeds τ = outlier_threshold · mean_j(var_i W_ij / U_jj²) keeps its
            value (fp16) and passes no error on; group ranges are fit without likely outliers
            (`grid.loo_qparams`). Needs dynamic groups (no act_order). The (out, in) bool mask of the
            weights kept so is appended to `outliers`.
        overwrite: W is the caller's to overwrite (e.g. a stacked copy of several Linears): when it is
            float32 already, the sweep works in it and returns it as W_hat, instead of a copy.
    Returns:
        (W_hat (out, in) float32, QuantizedWeight or None, keep-mask (out, in) bool).
    """
    W = W.detach().float()
    if not overwrite:
        W = W.clone()  # (out, in), the working copy that becomes W_hat
    H = H.detach().float()  # (in, in), read only: dead columns' diagonal is set to 1 in the factorization's copy
    dead = torch.diag(H) == 0
    out, d = W.shape
    W[:, dead] = 0.0
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.clone().bool()
    W.mul_(keep)
    fixed = prune is None  # the mask only changes when pruning
    segs = [slice(None)] if segments is None else row_slices(segments)
    if sum(segments or [out]) != out:
        raise ValueError(f"segments {segments} do not add up to the {out} rows of W")

    g = quant.group_size if quant is not None and quant.group_size > 0 else d
    nm = prune.nm if prune is not None else None
    if nm is not None and act_order:
        raise ValueError("act_order cannot be combined with N:M pruning (N:M groups are contiguous columns)")
    unit = math.lcm(g if g < d else 1, nm[1] if nm else 1)
    blocksize = max(unit, blocksize // unit * unit)  # groups never straddle a block
    ngroups = d // g
    scales = torch.empty(out, ngroups, device=W.device)
    zeros = torch.empty(out, ngroups, device=W.device)
    stat = _Stats(quant, out, ngroups, W.device) if quant is not None and quant.stat_bits is not None else None
    float_zero = stat is not None  # quantized zeros are not integers: round(w/s + z)
    if quant is not None and (quant.static_groups or g == d):
        # Ranges fixed from the (masked) weight in its original column order.
        dH = hinv_chol_diag(H, percdamp, name) if quant.params is not None else None
        for j in range(ngroups):
            cols = slice(j * g, (j + 1) * g)
            sc, ze = _group_params(W[:, cols], quant, j, dH[cols] if dH is not None else None)
            scales[:, j], zeros[:, j] = stat(j, sc, ze) if stat is not None else (sc, ze)
    dynamic = quant is not None and not (quant.static_groups or g == d)
    if act_order and dynamic:
        raise ValueError("act_order with groups needs static_groups (groups must stay contiguous)")

    perm = (torch.argsort(torch.diag(H).masked_fill(dead, 1.0), descending=True) if act_order
            else torch.arange(d, device=W.device))
    if act_order:
        W, H, keep, dead = W[:, perm], H[perm][:, perm], keep[:, perm], dead[perm]
    group_of = perm // g  # group of each processed column, in the original order
    U = inverse_hessian_upper(H, percdamp, name=name, numerics=numerics, dead=dead)  # (d, d)
    del H
    tau = None
    if outlier_threshold is not None:
        if quant is None or not dynamic:
            raise ValueError("outliers (SpQR) need quantization with dynamic groups (group_size > 0, no act_order)")
        tau = outlier_threshold * float((W.var(0) / torch.diag(U).square()).mean())
    sparse = torch.zeros_like(W, dtype=torch.bool) if tau is not None else None

    pre = torch.empty_like(W) if latent is not None else None
    fused = fused_block_sweep(W, quant, fixed, act_order, tau)
    if fused is not None:  # group parameters transposed, (groups, out), as the kernel reads and writes them
        St, Zt = scales.T.contiguous(), zeros.T.contiguous()
        maxqs = torch.tensor([float(quant.group_maxq(j)) for j in range(ngroups)], device=W.device)
    sub = _sub_block(blocksize, g if dynamic else None, nm)
    masked = not fixed or not bool(keep.all())  # a mask to apply per column at all
    groups = group_of.tolist()
    if quant is not None:  # per group: (scale, zero, maxq) as contiguous (out,) vectors
        params = {} if dynamic else {j: (scales[:, j].contiguous(), zeros[:, j].contiguous(), quant.group_maxq(j))
                                     for j in range(ngroups)}
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        b = i2 - i1
        # The block transposed, (b, out): column i of the block is the contiguous row Wt[i], so every
        # per-column op and the rank-1 updates run on contiguous memory.
        Wt = W[:, i1:i2].T.contiguous()
        Kt = keep[:, i1:i2].T.contiguous()
        Et = torch.zeros_like(Wt)
        U1 = U[i1:i2, i1:i2]  # (b, b)
        dU = torch.diag(U1)  # (b,)
        if fused is not None:  # the whole block in one launch; then the same lazy GEMM as below
            Et = fused(Wt, U1, St, Zt, maxqs, g, i1, quant.grid, dynamic, Kt if masked else None)
            W[:, i1:i2] = Wt.T
            if pre is not None:
                pre[:, i1:i2] = (Wt + Et * dU[:, None]).T
            if i2 < d:
                W[:, i2:].addmm_(Et.T, U[i1:i2, i2:], alpha=-1.0)
            continue
        dUl = dU.tolist()
        if not fixed and nm is None and prune.sparsity > 0:
            score = Wt.square() / dU[:, None].square()  # (b, out): OBS saliency w²/[H⁻¹]_jj²
            for rows in segs:  # each Linear's own threshold over this block of columns
                k = int(score[:, rows].numel() * prune.sparsity)
                if k > 0:
                    thresh = score[:, rows].flatten().kthvalue(k).values
                    Kt[:, rows] &= score[:, rows] > thresh
        Mt = Kt.float() if masked else None  # the mask as 0/1 floats (a bool multiplier costs ~4x)
        Ot = torch.zeros_like(Kt) if tau is not None else None  # this block's outliers, (b, out)
        nm_done = 0  # block columns [0, nm_done) have their N:M masks (chosen in column order)

        def choose_nm(upto):  # adaptive N:M masks of the N:M groups up to column `upto`, from the current Wt
            nonlocal nm_done
            n, m = nm
            j, e = nm_done, min(-(-upto // m) * m, b)
            if e <= j:
                return
            nm_done = e
            score = Wt[j:e].square() / dU[j:e, None].square()  # (span, out)
            Kt[j:e] &= ~nm_drop(score.view((e - j) // m, m, -1), m - n).view(e - j, -1)
            Mt[j:e] = Kt[j:e]

        # Two-level lazy updates: inside a sub-block of `sub` columns the error of each column goes
        # to the sub-block's later columns (rank-1); at the sub-block's end, to the block's remaining
        # columns in one GEMM. A group's range is read at a sub-block start, when every column of the
        # block is up to date; an N:M group's mask at its first column, whose M columns lie in the
        # current sub-block (sub is a multiple of M) and carry every earlier column's error.
        for j1 in range(0, b, sub):
            j2 = min(j1 + sub, b)
            for i in range(j1, j2):
                col = i1 + i
                if quant is not None and dynamic and col % g == 0:
                    # The group's range from its current weights and the masks known now (a fixed one, this
                    # block's unstructured one, and N:M masks of groups that began before it: none when
                    # group_size is a multiple of M, as in every grid this project ships)
                    gi = groups[col]
                    Wg = Wt[i:i + g] * Mt[i:i + g] if masked else Wt[i:i + g]
                    sc, ze = _group_params(Wg.T, quant, gi, dU[i:i + g], tau)
                    if stat is not None:
                        sc, ze = stat(gi, sc, ze)
                    scales[:, gi], zeros[:, gi] = sc, ze
                    params[gi] = (sc.contiguous(), ze.contiguous(), quant.group_maxq(gi))
                if not fixed and nm is not None:
                    # an N:M group's mask is chosen when its first column comes up, from weights that carry
                    # every earlier column's error (SparseGPT's rule). Choosing a quantization group's masks
                    # all at its start, from weights before the group's own updates, raised the joint
                    # pass's error (2:4 + W4 g32 on correlated inputs: 0.296 vs 0.282)
                    choose_nm(i + 1)
                w = Wt[i]
                if quant is not None:
                    gi = groups[col]
                    sc, ze, maxq = params[gi]
                    q = torch.div(w, sc).add_(ze).round_() if float_zero else torch.div(w, sc).round_().add_(ze)
                    if isinstance(maxq, int):
                        q.clamp_(0, maxq)
                    else:  # a per-row bit map: (out,) largest codes
                        torch.minimum(q.clamp_(min=0), maxq, out=q)
                    q.sub_(ze).mul_(sc)
                    if masked:  # = quant(w·mask)·mask: quantization is elementwise
                        q.mul_(Mt[i])
                else:
                    q = w * Mt[i] if masked else w
                if tau is not None:  # SpQR: a weight the grid would cost too much keeps its value
                    big = (w - q).div_(dUl[i]).square_() > tau
                    if masked:
                        big &= Kt[i]
                    if bool(big.any()):
                        q = torch.where(big, w.half().float(), q)
                        Ot[i] = big
                err = torch.sub(Wt[i], q, out=Et[i]).div_(dUl[i])  # (out,), written in place into Et
                if i + 1 < j2:
                    Wt[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
                Wt[i].copy_(q)
            if j2 < b:
                Wt[j2:].addmm_(U1[j1:j2, j2:].T, Et[j1:j2], alpha=-1.0)
        W[:, i1:i2] = Wt.T
        keep[:, i1:i2] = Kt.T
        if Ot is not None:
            sparse[:, i1:i2] = Ot.T
        if pre is not None:  # w_pre = q + err·U_ii, column by column, without a per-column copy
            pre[:, i1:i2] = (Wt + Et * dU[:, None]).T
        if i2 < d:
            W[:, i2:].addmm_(Et.T, U[i1:i2, i2:], alpha=-1.0)

    del U, U1, dU  # the factor's storage (U1 is a view of it), before the codes' buffer is allocated
    if fused is not None:
        scales, zeros = St.T.contiguous(), Zt.T.contiguous()
    if act_order:
        inv = torch.argsort(perm)
        W, keep = W[:, inv], keep[:, inv]
        pre = pre[:, inv] if pre is not None else None
    if pre is not None:
        latent.append(pre * keep)
    if outliers is not None and sparse is not None:
        outliers.append(sparse)
    qw = None
    if quant is not None:
        qw = QuantizedWeight(None, scales, zeros, quant.bits, g, quant.grid, (out, d),
                             quant.bit_map.clone().to(torch.uint8) if quant.bit_map is not None else None,
                             stat.record() if stat is not None else None).encode(W)
    return W, qw, keep
