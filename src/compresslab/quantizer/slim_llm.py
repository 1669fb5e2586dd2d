"""SliM-LLM: salience-driven mixed-precision quantization (Huang et al., "SliM-LLM: Salience-Driven
Mixed-Precision Quantization for Large Language Models", ICML 2025), on top of GPTQ.

- SBA (salience-determined bit allocation): group salience S_c = Σ_{i, j∈c} W_ij² / U_jj², U the
  upper Cholesky factor of the damped H⁻¹ (the reference code's `Hinv`, as in GPTQ/SparseGPT);
  the k least salient groups get b−1 bits, the k most salient b+1, the rest b, so the average
  is exactly b. k is chosen per layer by the KL divergence between softmax(XWᵀ) and softmax(XŴᵀ)
  on calibration inputs, over a grid of fractions of the groups.
- SQC (salience-weighted quantizer calibration): per output row and group, the range factor
  f ∈ [0.9, 1.1] (101 points) scaling (min, max) minimizes Σ ω_ij |W_ij − Q(W_ij)|^2.4, with
  ω = λ for elements whose standardized salience |z| > 2 and 1 elsewhere.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..obs import GridSpec, hinv_chol_diag, obs_compress
from ..stages import layer_state, sweep_stacked
from . import grid as _grid
from .base import WeightQuantizer

log = logging.getLogger(__name__)

SQC_FACTORS = torch.linspace(0.9, 1.1, 101)
SQC_P = 2.4
SQC_Z = 2.0


def group_salience(W: torch.Tensor, u_diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """(C,) salience of each group of `group_size` input columns: Σ W_ij² / U_jj², with
    u_diag = diag(U), U = chol((H + λI)⁻¹) upper (`obs.hinv_chol_diag`)."""
    S = W.float().square() / u_diag.float().square()[None, :]  # (out, in)
    return S.sum(0).reshape(-1, group_size).sum(1)


def sba_bit_map(salience: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(C,) bits: the k least salient groups b−1, the k most salient b+1, the rest b."""
    C = salience.numel()
    if not 0 <= 2 * k <= C:
        raise ValueError(f"k={k} groups at each end needs 2k <= {C} groups")
    order = torch.argsort(salience, stable=True)
    bit_map = torch.full((C,), bits, dtype=torch.int64)
    if k:
        bit_map[order[:k]] = bits - 1
        bit_map[order[-k:]] = bits + 1
    return bit_map


def sqc_params(Wg: torch.Tensor, sal: torch.Tensor, bits: int, grid_: str = "asym", lam: float = 1.0,
               factors: torch.Tensor = SQC_FACTORS, p: float = SQC_P):
    """Per-row (scale, zero) for the group Wg (out, k) after the salience-weighted range search."""
    Wg = Wg.float()
    z = (sal - sal.mean(1, keepdim=True)) / sal.std(1, keepdim=True).clamp_min(1e-12)
    omega = torch.where(z.abs() > SQC_Z, lam, 1.0)  # (out, k)
    f = factors.to(Wg.device)[:, None]  # (F, 1)
    scale, zero = _grid.qparams(Wg.amin(1)[None] * f, Wg.amax(1)[None] * f, bits, grid_)  # (F, out)
    maxq = _grid.max_code(bits, grid_)  # an int, or (out,) for a per-row bit map
    maxq = maxq[:, None] if isinstance(maxq, torch.Tensor) else maxq
    q = _grid.fake_quantize(Wg[None], scale[..., None], zero[..., None], maxq)  # (F, out, k)
    err = ((Wg[None] - q).abs().pow(p) * omega[None]).sum(-1)  # (F, out)
    best = err.argmin(0)  # (out,)
    rows = torch.arange(Wg.shape[0], device=Wg.device)
    return scale[best, rows], zero[best, rows]


def rtn_mixed(W: torch.Tensor, bit_map: torch.Tensor | None, bits: int, group_size: int, grid_: str,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest with per-group bits (a cheap stand-in used to rank SBA candidates)."""
    out, inp = W.shape
    view = W.float().reshape(out, inp // group_size, group_size)  # (out, C, g)
    b = (bit_map if bit_map is not None else torch.full((inp // group_size,), bits)).to(W.device).float()[None, :]
    scale, zero = _grid.qparams(view.amin(-1), view.amax(-1), b, grid_)  # (out, C)
    W_hat = _grid.fake_quantize(view, scale[..., None], zero[..., None], _grid.max_code(b, grid_)[..., None]).reshape(out, inp)
    return W_hat * keep if keep is not None else W_hat


def output_kl(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """Mean over tokens of KL(softmax(XWᵀ) ‖ softmax(XŴᵀ))."""
    Y, Yq = F.linear(X, W, bias), F.linear(X, W_hat, bias)
    return float(F.kl_div(F.log_softmax(Yq, -1), F.log_softmax(Y, -1), log_target=True, reduction="batchmean"))


class SliMLLM(WeightQuantizer):
    """`quantizer=slim_llm`: GPTQ with SBA mixed precision and SQC range search.

    Args: bits (target average b, 2..7), group_size (128; SmolLM2 needs 64), grid,
        sba / sqc (turn either part off), sqc_lambda (weight of salient elements in SQC),
        sba_grid (fractions of groups moved to b±1, searched by KL), percdamp, blocksize.
    """

    needs = frozenset({"hessian", "input_sample"})
    bit_range = (2, 7)  # b−1 >= 1 and b+1 <= 8

    def __init__(self, bits: int = 2, group_size: int = 128, grid: str = "asym", sba: bool = True,
                 sqc: bool = True, sqc_lambda: float = 1.0, sba_grid=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
                 percdamp: float = 0.01, blocksize: int = 128, act_bits: int | None = None,
                 act_granularity: str | None = None, act_group_size: int = 64):
        _grid.check_bits(bits, *self.bit_range)
        super().__init__(bits, group_size, grid, act_bits, act_granularity, act_group_size)
        if group_size < 1:
            raise ConfigError("quantizer=slim_llm allocates bits per group: set quantizer.group_size (e.g. 128, or 64 for SmolLM2)")
        grid_ = sorted({float(f) for f in sba_grid})
        if not grid_ or grid_[0] < 0 or grid_[-1] > 0.5:
            raise ConfigError(f"quantizer.sba_grid={list(sba_grid)} must hold fractions in [0, 0.5]")
        if sqc_lambda <= 0:
            raise ConfigError(f"quantizer.sqc_lambda={sqc_lambda} must be > 0")
        self.sba, self.sqc, self.sqc_lambda, self.sba_grid = sba, sqc, sqc_lambda, grid_
        self.percdamp, self.blocksize = percdamp, blocksize

    def _spec(self, bit_map):
        params = None
        if self.sqc:
            lam, g = self.sqc_lambda, self.grid
            params = lambda Wg, sal, bits: sqc_params(Wg, sal, bits, g, lam)  # noqa: E731
        return GridSpec(self.bits, self.group_size, self.grid, False, bit_map, params)

    def bit_maps(self, W: torch.Tensor, H: torch.Tensor, numerics: list | None = None) -> list[tuple[int, torch.Tensor | None]]:
        """Candidate (k, bit map) pairs of the SBA search (just uniform b when SBA is off)."""
        if not self.sba:
            return [(0, None)]
        sal = group_salience(W, hinv_chol_diag(H, self.percdamp, numerics=numerics), self.group_size)
        C = sal.numel()
        ks = sorted({min(C // 2, round(f * C)) for f in self.sba_grid})
        return [(k, sba_bit_map(sal, self.bits, k)) for k in ks]

    def quantize_with(self, name, W, H, bit_map, keep=None, numerics=None, latent=None, overwrite=False):
        W_hat, qw, _ = obs_compress(W, H, quant=self._spec(bit_map), keep=keep, percdamp=self.percdamp,
                                    blocksize=self.blocksize, name=name, numerics=numerics, latent=latent,
                                    overwrite=overwrite)
        return W_hat, qw

    def pick(self, name, W, stats, keep=None, numerics=None):
        """(KL, k, bit map) of the SBA candidate with the lowest output KL (candidates rounded to
        nearest, which ranks them at a fraction of GPTQ's cost)."""
        cands = self.bit_maps(W, stats.hessian, numerics)
        best = (0.0, *cands[0])
        if len(cands) > 1:
            X = stats.input_sample.to(W.device)
            scored = [(output_kl(X, W.float(), rtn_mixed(W, bm, self.bits, self.group_size, self.grid, keep)), k, bm)
                      for k, bm in cands]
            best = min(scored, key=lambda t: t[0])
        log.debug("%s: SBA k=%d (KL %.3g)", name, best[1], best[0])
        return best

    def search(self, name, W, stats, keep=None, numerics=None, latent=None):
        """Pick the SBA bit map, then quantize once with it."""
        kl, k, bit_map = self.pick(name, W, stats, keep, numerics)
        W_hat, qw = self.quantize_with(name, W, stats.hessian, bit_map, keep, numerics, latent)
        return kl, k, W_hat, qw

    @torch.no_grad()
    def compress(self, name, layer, stats=None):
        state = layer_state(layer, create=True)
        keep = state.keep_mask(layer.weight.device)
        _, k, W_hat, qw = self.search(name, layer.weight.data.float(), stats, keep, state.numerics)
        self.finish(layer, W_hat, qw)

    @torch.no_grad()
    def compress_group(self, items, stats):
        """Linears that share this input (q/k/v, gate/up): each picks its own SBA bit map, then their
        GPTQ passes run as ONE sweep over the stacked rows with a bit map per row (rows never
        interact, so each Linear gets what its own sweep gives)."""
        maps = []
        for name, lin in items:
            state = layer_state(lin, create=True)
            maps.append(self.pick(name, lin.weight.detach().float(), stats, state.keep_mask(lin.weight.device),
                                  state.numerics)[2])
        bit_map = None
        if maps[0] is not None:  # (Σout, C): each Linear's map on each of its rows
            bit_map = torch.cat([m.reshape(1, -1).expand(lin.out_features, -1) for m, (_, lin) in zip(maps, items)])

        def sweep(W, keep, name, sizes, numerics):
            return self.quantize_with(name, W, stats.hessian, bit_map, keep, numerics, overwrite=True)

        sweep_stacked(items, sweep, lambda lin, r, out: self.finish(lin, out[0][r], out[1].rows(r.start, r.stop)))

    def __repr__(self):
        return f"SliMLLM({self._tag()}, sba={self.sba}, sqc={self.sqc}, lambda={self.sqc_lambda})"
