"""`eval=full`: perplexity then zero-shot accuracy, one metrics dict."""

from __future__ import annotations


class Full:
    """Runs `ppl` (a Perplexity) and `zeroshot` (a ZeroShot), as composed in conf/eval/full.yaml."""

    def __init__(self, ppl, zeroshot, dense_baseline: bool = False):
        self.evals = [ppl, zeroshot]
        self.dense_baseline = dense_baseline

    def check(self) -> None:
        for e in self.evals:
            e.check()

    def __call__(self, model, tokenizer) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.evals:
            out.update(e(model, tokenizer))
        return out
