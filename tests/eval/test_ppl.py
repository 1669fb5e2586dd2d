import math
from types import SimpleNamespace

import torch
from torch import nn

from compresslab.eval.ppl import perplexity


class FixedLogits(nn.Module):
    """A 'model' whose logits at position t depend only on the input token (a bigram table)."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_perplexity_matches_hand_computed_nll():
    torch.manual_seed(0)
    V = 5
    table = torch.randn(V, V)
    ids = torch.tensor([0, 3, 1, 4, 2, 2, 1, 0, 3, 3, 4])  # 11 tokens: 2 windows of 4, 3 left over
    ppl, n = perplexity(FixedLogits(table), ids, seqlen=4, progress=False)
    # by hand: windows [0:4] and [4:8], each predicting tokens 1..3 from 0..2
    nll = []
    for w in range(2):
        win = ids[4 * w : 4 * w + 4].tolist()
        for t in range(3):
            row = table[win[t]].tolist()
            logz = math.log(sum(math.exp(v) for v in row))
            nll.append(logz - row[win[t + 1]])
    assert n == 6
    assert abs(ppl - math.exp(sum(nll) / len(nll))) < 1e-6 * ppl  # fp32 logits


def test_max_windows_and_uniform_model():
    V = 7
    ppl, n = perplexity(FixedLogits(torch.zeros(V, V)), torch.arange(40) % V, seqlen=8, max_windows=3, progress=False)
    assert n == 21
    assert abs(ppl - V) < 1e-6  # uniform prediction: ppl equals the vocabulary size
