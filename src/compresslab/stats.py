"""Input statistics of a Linear group, accumulated once per shared input and freed after use."""

from __future__ import annotations

import torch

KNOWN_STATS = frozenset({"hessian", "act_norm"})


class LayerStats:
    """Streaming statistics of the inputs X (n, d) of one Linear group.

    - ``hessian``: H = 2/n · XᵀX  (d, d), the GPTQ/SparseGPT convention.
    - ``act_norm``: ‖X_j‖₂ over all n tokens  (d,), Wanda's input-norm.

    Only what some stage declared in its ``needs`` is computed.
    """

    def __init__(self, needs: frozenset[str] | set[str], dim: int, device: torch.device | str = "cpu"):
        unknown = set(needs) - KNOWN_STATS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN_STATS)}")
        self.dim, self.n = dim, 0
        self._xtx = torch.zeros(dim, dim, device=device) if "hessian" in needs else None
        self._sq = torch.zeros(dim, device=device) if "act_norm" in needs else None

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).float()  # (n_batch, d)
        self.n += x.shape[0]
        if self._xtx is not None:
            self._xtx.addmm_(x.T, x)
        if self._sq is not None:
            self._sq.add_(x.square().sum(0))

    def _require(self, t, what):
        if t is None:
            raise RuntimeError(f"'{what}' was not collected: add it to the stage's `needs`")
        if self.n == 0:
            raise RuntimeError("no inputs were observed")
        return t

    @property
    def hessian(self) -> torch.Tensor:
        return self._require(self._xtx, "hessian") * (2.0 / self.n)

    @property
    def act_norm(self) -> torch.Tensor:
        return self._require(self._sq, "act_norm").sqrt()

    def free(self) -> None:
        self._xtx = self._sq = None
