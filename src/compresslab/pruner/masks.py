"""Mask selection from scores: row-wise unstructured or N:M, shared by every pruner."""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): keep N of every M consecutive input weights."""
    if pattern in (None, "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"pruner.pattern={pattern!r} is not valid; use 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
    return int(m.group(1)), int(m.group(2))


def check_sparsity(sparsity: float, nm: tuple[int, int] | None) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"pruner.sparsity={sparsity} is out of range; use 0 <= sparsity < 1")
    if nm is not None and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise ConfigError(f"pruner.sparsity={sparsity} conflicts with pruner.pattern={nm[0]}:{nm[1]}, which "
                          f"prunes {1 - nm[0] / nm[1]:g}; set pruner.sparsity={1 - nm[0] / nm[1]:g}")


def check_width(name: str, in_features: int, nm: tuple[int, int] | None) -> None:
    if nm is not None and in_features % nm[1]:
        raise ConfigError(f"pattern {nm[0]}:{nm[1]} needs the input width to be a multiple of {nm[1]}, but "
                          f"{name} has {in_features}; use pruner.pattern=unstructured or skip this layer")


def keep_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean keep-mask (out, in) that drops the lowest scores.

    Unstructured: exactly floor(in·sparsity) weights per output row (the row-wise comparison of
    SparseGPT and Wanda). N:M: the N highest of every M consecutive input columns per row.
    """
    out, inp = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(out, inp // m, m)  # (out, in/M, M)
        idx = groups.topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(out, inp)
    k = int(inp * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = scores.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_drop(score: torch.Tensor, k: int) -> torch.Tensor:
    """(G, M, out) scores -> bool (G, M, out), True for the k lowest of each group of M along dim 1
    (exactly k per group; which of equal scores goes is unspecified: ties are in practice zero
    weights, so W_hat is the same either way). For many groups (a quantization group's N:M masks
    at once) each entry's rank is counted with M(M-1)/2 elementwise comparisons, ~3x faster on the
    CPU than topk along a length-M dim; for one group topk's single call wins."""
    G, m, out = score.shape
    if G == 1:
        drop = torch.zeros_like(score, dtype=torch.bool)
        return drop.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    rank = torch.zeros(G, m, out, dtype=torch.uint8, device=score.device)
    for a in range(m):
        for b in range(a + 1, m):
            below = score[:, b] < score[:, a]  # b ranks below a; on a tie a (the lower index) does
            rank[:, a] += below
            rank[:, b] += ~below
    return rank < k


def nm_valid(keep: torch.Tensor, nm: tuple[int, int]) -> bool:
    """True when every group of M consecutive input weights of `keep` (out, in) keeps at most N."""
    n, m = nm
    out, inp = keep.shape
    return inp % m == 0 and bool((keep.reshape(out, inp // m, m).sum(-1) <= n).all())
