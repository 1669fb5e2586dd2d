"""Input statistics of a Linear group, accumulated once per shared input and freed after use."""

from __future__ import annotations

import torch

KNOWN_STATS = frozenset({"hessian", "act_norm", "act_absmean", "jsq", "input_sample", "fisher"})
SAMPLE_PER_BATCH, SAMPLE_MAX = 1024, 8192  # input_sample: evenly spaced tokens per batch, capped
JSQ_CLIP_TOP = 0.01  # JSQ clips the top 1% of |x| before taking its statistics
GRAM_BLOCK = 256  # block rows of the symmetric Gram accumulation


def gram_upper_(acc: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """acc += xᵀx (x (n, d)) on the blocks on and above the diagonal only: block row i gets
    x[:, i:i+b]ᵀ · x[:, i:], so k block rows cost (k + 1)/2k of the full product's FLOPs (0.58 at
    d = 1536); the blocks below the diagonal stay as they were. `mirror_upper_` mirrors the result."""
    d = x.shape[1]
    if d <= block:
        acc.addmm_(x.T, x)
        return
    for i in range(0, d, block):
        acc[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:])


def mirror_upper_(acc: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Make `acc` the symmetric matrix whose upper triangle `gram_upper_` accumulated, in place: each
    block column below the diagonal gets the transpose of the block row beside it (copies only, so
    exactly the values of the upper triangle; no (d, d) temporary)."""
    d = acc.shape[0]
    for i in range(0, d, block):
        e = min(i + block, d)
        diag = acc[i:e, i:e]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).T)
        if e < d:
            acc[e:, i:e] = acc[i:e, e:].T
    return acc


def clip_top(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Clamp |x| at its (1 − frac) quantile over the whole tensor (JSQ's activation editor)."""
    k = int(frac * x.numel())
    if k < 1:
        return x
    flat = x.detach().abs().flatten().float()
    thresh = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest |x|
    return x.clamp(-thresh, thresh)


class LayerStats:
    """Streaming statistics of the inputs X (n, d) of one Linear group.

    - ``hessian``: H = 2/n · XᵀX  (d, d), the GPTQ/SparseGPT convention.
    - ``act_norm``: ‖X_j‖₂ over all n tokens  (d,), Wanda's input norm.
    - ``act_absmean``: mean_t |X_tj|  (d,), AWQ's and L2QER's activation scale.
    - ``jsq``: after clipping the top 1% of |x|, ‖X_j‖₂ (``jsq_norm``, (d,)) and the mean over
      samples of the (T, d) input sequence (``jsq_mean``), which JSQ's range salience uses.

    - ``input_sample``: up to 8192 input rows (n_s, d), evenly spaced over each batch, for
      stages that need the actual layer outputs (e.g. SliM-LLM's KL search).
    - ``fisher``: not a statistic of X: the diagonal Fisher (out, in) of each of the group's weights,
      from calibration gradients (fisher.py), computed once before the block loop; the engine
      attaches the group's entries (`attach_fisher`) and a stage reads `fisher_of(name)`.

    Only what some stage declared in its ``needs`` is computed.
    """

    def __init__(self, needs: frozenset[str] | set[str], dim: int, device: torch.device | str = "cpu"):
        unknown = set(needs) - KNOWN_STATS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN_STATS)}")
        self.dim, self.n, self.samples = dim, 0, 0
        self._xtx = torch.zeros(dim, dim, device=device) if "hessian" in needs else None  # upper blocks
        self._hessian: torch.Tensor | None = None  # the mirrored, scaled H, until the next batch
        self._sq = torch.zeros(dim, device=device) if "act_norm" in needs else None
        self._abs = torch.zeros(dim, device=device) if "act_absmean" in needs else None
        self._jsq = "jsq" in needs
        self._jsq_sq = torch.zeros(dim, device=device) if self._jsq else None
        self._jsq_seq: torch.Tensor | None = None  # (T, d) sum over samples
        self._sample: list[torch.Tensor] | None = [] if "input_sample" in needs else None
        self._fisher: dict[str, torch.Tensor] | None = {} if "fisher" in needs else None

    def add_batch(self, x: torch.Tensor) -> None:
        x3 = x.float().reshape(-1, x.shape[-2] if x.dim() > 2 else 1, self.dim)  # (B, T, d)
        x = x3.reshape(-1, self.dim)  # (n_batch, d)
        if self._hessian is not None:
            raise RuntimeError("LayerStats.add_batch after the Hessian was read: observe every batch first")
        self.n += x.shape[0]
        self.samples += x3.shape[0]
        if self._xtx is not None:
            gram_upper_(self._xtx, x)  # half the FLOPs: H is symmetric
        if self._sq is not None:
            self._sq.add_(x.square().sum(0))
        if self._abs is not None:
            self._abs.add_(x.abs().sum(0))
        if self._sample is not None and sum(t.shape[0] for t in self._sample) < SAMPLE_MAX:
            step = max(1, x.shape[0] // SAMPLE_PER_BATCH)
            self._sample.append(x[::step][:SAMPLE_PER_BATCH].clone())
        if self._jsq:
            xc = clip_top(x3, JSQ_CLIP_TOP)
            self._jsq_sq.add_(xc.square().sum((0, 1)))
            seq = xc.sum(0)  # (T, d)
            if self._jsq_seq is None:
                self._jsq_seq = seq
            else:
                t = min(seq.shape[0], self._jsq_seq.shape[0])
                self._jsq_seq = self._jsq_seq[:t] + seq[:t]

    def _require(self, t, what):
        if t is None:
            raise RuntimeError(f"'{what}' was not collected: add it to the stage's `needs`")
        if self.n == 0:
            raise RuntimeError("no inputs were observed")
        return t

    @property
    def hessian(self) -> torch.Tensor:
        """H (d, d), built once after the last batch and shared by every stage of the group: read it,
        never modify it in place (a (d, d) copy per access is 0.5 GB at d = 11008)."""
        if self._hessian is None:  # the accumulator becomes H (no second (d, d) matrix)
            self._hessian = mirror_upper_(self._require(self._xtx, "hessian")).mul_(2.0 / self.n)
            self._xtx = None
        return self._hessian

    @property
    def has_hessian(self) -> bool:
        return (self._xtx is not None or self._hessian is not None) and self.n > 0

    @property
    def act_norm(self) -> torch.Tensor:
        return self._require(self._sq, "act_norm").sqrt()

    @property
    def act_absmean(self) -> torch.Tensor:
        return self._require(self._abs, "act_absmean") / self.n

    @property
    def jsq_norm(self) -> torch.Tensor:
        return self._require(self._jsq_sq, "jsq").sqrt()

    @property
    def jsq_mean(self) -> torch.Tensor:
        return self._require(self._jsq_seq, "jsq") / self.samples

    @property
    def input_sample(self) -> torch.Tensor:
        return torch.cat(self._require(self._sample, "input_sample"))[:SAMPLE_MAX]

    def attach_fisher(self, entries: dict[str, torch.Tensor]) -> None:
        """The diagonal Fisher of this group's Linears, by full Linear name (the engine's)."""
        if self._fisher is not None:
            self._fisher.update(entries)

    def fisher_of(self, name: str) -> torch.Tensor:
        """F (out, in) of the Linear `name`; a stacked group's (q/k/v) names joined by ' + ' give the
        stacked rows."""
        fisher = self._require(self._fisher, "fisher")
        try:
            return torch.cat([fisher[n] for n in name.split(" + ")])
        except KeyError as e:
            raise RuntimeError(f"no Fisher information for {e.args[0]}: it was not among the Linears the "
                               "gradient pass covered") from None

    def free(self) -> None:
        self._xtx = self._hessian = self._sq = self._abs = self._jsq_sq = self._jsq_seq = self._sample = None
        self._fisher = None
