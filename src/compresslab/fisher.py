"""The diagonal (empirical) Fisher information of the Linear weights, from calibration gradients.

F_ij = 1/N · Σ_s (∂ℓ_s/∂W_ij)²  over the N calibration windows s, ℓ_s the window's mean next-token
cross-entropy: the sensitivity SqueezeLLM weights its k-means with (Kim et al., "SqueezeLLM: Dense-and-
Sparse Quantization", ICML 2024, §3.1, per-sample squared gradients) and FWSVD sums per output row
(Hsu et al., "Language Model Compression with Weighted Low-Rank Factorization", ICLR 2022).

Computed once per run, before the block loop, on the dense model (one forward and backward per window);
stages ask for it with `needs={"fisher"}` and read `stats.fisher_of(name)` for their Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


def fisher_diagonal(model: nn.Module, ids: torch.Tensor, linears: list[tuple[str, nn.Module]],
                    progress: bool = False, reduce=None) -> tuple[dict[str, torch.Tensor], int]:
    """({name: F (out, in) float32 on the CPU}, windows) for the weights of `linears`.

    ids: (N, T) calibration token ids; one window per backward pass, so each squared gradient is a
    single sample's. `reduce(t)` sums a tensor over ranks (data parallel: each rank holds its share
    of the windows) and the count is summed with it; one process: identity."""
    weights = [lin.weight for _, lin in linears]
    for (name, lin), w in zip(linears, weights):
        if not isinstance(w, nn.Parameter):
            raise ValueError(f"{name}: its weight is not a parameter of its own (a fused expert slice?); the "
                             "Fisher pass needs one gradient per Linear")
    device = weights[0].device if weights else torch.device("cpu")
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in weights]
    reached = [0] * len(weights)  # windows whose loss depends on each weight
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the gradients of the model as it will be used
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for s in tqdm(range(ids.shape[0]), desc="fisher", disable=not progress):
                x = ids[s:s + 1].to(device)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                # allow_unused: an MoE expert the window's tokens never reach has no gradient (F += 0)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for k, (a, g) in enumerate(zip(acc, grads)):
                    if g is not None:
                        a.addcmul_(g.float(), g.float())
                        reached[k] += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    never = [name for (name, _), r in zip(linears, reached) if not r]
    if never:  # legitimate for an MoE expert no calibration token reaches; anything else is worth a look
        log.warning("fisher: %d Linears never reached by a calibration window (Fisher 0), e.g. %s", len(never),
                    never[:3])
    n = torch.tensor(float(ids.shape[0]), device=device)
    if reduce is not None:
        acc = [reduce(a) for a in acc]
        n = reduce(n)
    count = int(n.item())
    return {name: (a / max(count, 1)).cpu() for (name, _), a in zip(linears, acc)}, count
