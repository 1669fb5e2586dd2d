"""Perplexity on held-out text, the GPTQ/SparseGPT protocol.

Join the test split (with "\\n\\n" for wikitext2), tokenize once, cut non-overlapping windows of
`seqlen` tokens, and report exp(mean token NLL) over all predicted tokens.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sources import DATASETS, check_dataset, joined_text
from ..errors import ConfigError
from ..utils import resolve_device

log = logging.getLogger(__name__)

STREAM_ROWS = 256  # positions per logits slice for a streamed model (a 128k vocabulary: 128 MB in fp32)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               device: torch.device | str = "cpu", progress: bool = True) -> tuple[float, int]:
    """(ppl, tokens evaluated) of `model` on the 1-D token stream `ids`."""
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin < 1:
        raise ConfigError(f"the eval text has {ids.numel()} tokens, fewer than one window of eval.seqlen={seqlen}")
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    if hasattr(model, "hidden"):  # a streamed model (stream.StreamedModel): all windows block by block
        windows = ids[: nwin * seqlen].view(nwin, seqlen)
        h = model.hidden(windows, progress=progress)  # (W, T, C)
        for w in range(nwin):  # logits a slice of positions at a time: (rows, V), not (T, V)
            for s in range(0, seqlen - 1, STREAM_ROWS):
                e = min(s + STREAM_ROWS, seqlen - 1)
                logits = model.logits(h[w : w + 1, s:e])[0]  # (rows, V)
                target = windows[w, s + 1 : e + 1].to(logits.device)
                nll += F.cross_entropy(logits.float(), target, reduction="sum").double().cpu()
            count += seqlen - 1
        return math.exp(nll.item() / count), count
    for w in tqdm(range(nwin), desc="ppl", disable=not progress, leave=False):
        x = ids[w * seqlen : (w + 1) * seqlen].to(device)[None]  # (1, T)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1]  # (T-1, V)
        nll += F.cross_entropy(logits.float(), x[0, 1:], reduction="sum").double().cpu()
        count += seqlen - 1
    return math.exp(nll.item() / count), count


class Perplexity:
    """`eval=ppl`: `datasets` ([wikitext2]), `seqlen` (2048), `max_windows` (null = all), `dense_baseline`.
    Runs on streamed models too (`model.offload=disk`): every window passes one block at a time."""

    streams = True

    def __init__(self, datasets=("wikitext2",), seqlen: int = 2048, max_windows: int | None = None,
                 dense_baseline: bool = False, device: str = "auto", progress: bool = True):
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        for d in self.datasets:
            if d not in DATASETS or d == "text":
                raise ConfigError(f"unknown eval dataset {d!r}; use wikitext2 or c4")
        if seqlen < 2 or (max_windows is not None and max_windows < 1):
            raise ConfigError(f"eval.seqlen ({seqlen}) must be >= 2 and eval.max_windows ({max_windows}) >= 1 or null")
        self.seqlen, self.max_windows, self.dense_baseline = seqlen, max_windows, dense_baseline
        self.device, self.progress = resolve_device(device), progress
        self._ids: dict[tuple[int, str], torch.Tensor] = {}

    def check(self) -> None:
        for d in self.datasets:
            check_dataset(d, split="eval")

    def tokens(self, tokenizer, dataset: str) -> torch.Tensor:
        key = (id(tokenizer), dataset)
        if key not in self._ids:
            self._ids[key] = tokenizer(joined_text(dataset, "eval"), return_tensors="pt").input_ids[0]
        return self._ids[key]

    def __call__(self, model, tokenizer) -> dict[str, float]:
        model.to(self.device)
        out = {}
        for d in self.datasets:
            ids = self.tokens(tokenizer, d)
            t0 = time.perf_counter()
            ppl, n = perplexity(model, ids, self.seqlen, self.max_windows, self.device, self.progress)
            dt = time.perf_counter() - t0
            out[f"ppl/{d}"] = ppl
            out[f"eval/{d}/tokens"] = float(n)
            out[f"eval/{d}/tokens_per_s"] = n / dt
            log.info("ppl/%s = %.4f over %d tokens (%.0f tok/s)", d, ppl, n, n / dt)
        return out
