"""Calibration windows: `nsamples` random, seeded windows of `seqlen` tokens."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .sources import check_dataset, joined_text

log = logging.getLogger(__name__)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows cut at seeded random offsets of a 1-D token stream."""
    if ids.numel() <= seqlen:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, fewer than data.seqlen={seqlen}+1")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # (N, T)


class CalibrationData:
    """`data.dataset=wikitext2|c4|text` (+ `data.path` for text), `nsamples`, `seqlen`, `seed`."""

    def __init__(self, dataset: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                 path: str | None = None):
        if nsamples < 1 or seqlen < 2:
            raise ConfigError(f"data.nsamples ({nsamples}) must be >= 1 and data.seqlen ({seqlen}) >= 2")
        self.dataset, self.nsamples, self.seqlen, self.seed, self.path = dataset, nsamples, seqlen, seed, path

    def check(self) -> None:
        check_dataset(self.dataset, self.path, "calibration")

    def __call__(self, tokenizer) -> torch.Tensor:
        """(nsamples, seqlen) int64 token ids."""
        if self.dataset == "c4":  # long documents only, as GPTQ does: tokenize lazily
            return self._c4(tokenizer)
        ids = tokenizer(joined_text(self.dataset, "calibration", self.path), return_tensors="pt").input_ids[0]
        log.info("calibration: %d x %d tokens from %s (%d available)", self.nsamples, self.seqlen, self.dataset,
                 ids.numel())
        return sample_windows(ids, self.nsamples, self.seqlen, self.seed)

    def _c4(self, tokenizer) -> torch.Tensor:
        from .sources import rows

        docs = rows("c4", "calibration")
        g = torch.Generator().manual_seed(self.seed)
        out = []
        while len(out) < self.nsamples:
            doc = docs[int(torch.randint(0, len(docs), (1,), generator=g))]
            ids = tokenizer(doc, return_tensors="pt").input_ids[0]
            if ids.numel() > self.seqlen:
                s = int(torch.randint(0, ids.numel() - self.seqlen, (1,), generator=g))
                out.append(ids[s : s + self.seqlen])
        return torch.stack(out)

    def __repr__(self):
        return f"CalibrationData({self.dataset}, {self.nsamples}x{self.seqlen}, seed={self.seed})"
