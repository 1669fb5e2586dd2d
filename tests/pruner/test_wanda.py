import torch

from compresslab.pruner.masks import nm_valid
from compresslab.pruner.wanda import Wanda, shift_zero_norms, wanda_scores
from compresslab.stats import LayerStats
from tests.conftest import correlated_inputs


def test_wanda_scores_match_brute_force():
    W = torch.randn(5, 16)
    X = correlated_inputs(40, 16)
    stats = LayerStats({"act_norm"}, 16)
    stats.add_batch(X[:25])
    stats.add_batch(X[25:])
    S = wanda_scores(W, stats.act_norm)
    for i in range(5):
        for j in range(16):
            ref = abs(W[i, j].item()) * sum(X[t, j].item() ** 2 for t in range(40)) ** 0.5
            assert abs(S[i, j].item() - ref) < 1e-4 * max(1.0, ref)


def test_wanda_prunes_lowest_score_per_row_and_nm():
    W = torch.randn(8, 32)
    X = correlated_inputs(64, 32)
    stats = LayerStats({"act_norm"}, 32)
    stats.add_batch(X)
    S = wanda_scores(W, stats.act_norm)
    W_hat, keep = Wanda(0.5).prune("l", W, stats)
    for r in range(8):  # every kept score beats every dropped one in its row
        assert S[r][keep[r]].min() >= S[r][~keep[r]].max()
        assert int(keep[r].sum()) == 16
    _, keep24 = Wanda(0.5, "2:4").prune("l", W, stats)
    assert nm_valid(keep24, (2, 4)) and int(keep24.sum()) == W.numel() // 2


def test_shift_zero_metrics_ranks_dead_channels_by_magnitude():
    norm = torch.tensor([0.0, 2.0, 0.0, 5.0])
    assert torch.equal(shift_zero_norms(norm), torch.tensor([2.0, 2.0, 2.0, 5.0]))
