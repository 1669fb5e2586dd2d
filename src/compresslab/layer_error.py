"""Each compressed Linear's relative output error ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs.

Two ways to the same quantity (W the dense weight, Ŵ the effective one: weight plus adapters):

- through the group's Hessian H ∝ XᵀX, right after the one-shot stages (`hessian_rel_error`);
- by running forwards with an `ErrorMeter` attached, once a later stage (SliM-LLM+'s clipping, a
  recovery) has changed the layer: X is then what the layer sees in the final compressed model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stages import effective_weight, layer_state


def hessian_rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """sqrt(tr(ΔHΔᵀ) / tr(WHWᵀ)), Δ = W − Ŵ: ‖(W − Ŵ)X‖ / ‖WX‖ for H = XᵀX (any positive scale)."""
    delta = W - W_hat
    num = ((delta @ H) * delta).sum()
    den = ((W @ H) * W).sum().clamp_min(1e-30)
    return float((num / den).clamp_min(0).sqrt())


class ErrorMeter:
    """While attached (a context manager), accumulates ‖(W_d − Ŵ)x‖² and ‖W_d x‖² over every input x
    the given Linears see. The hook runs before any other pre-hook (activation quantization), so x
    is the layer's input as the Hessian saw it, a rotation's online transform applied (the Hessian's
    hooks ran after it); only weights differ.

    Args:
        layers: {name: (Linear, dense weight (out, in))}; a dense weight on another device is moved
            per call (the end-to-end case keeps them on the CPU).
    """

    def __init__(self, layers: dict[str, tuple[nn.Module, torch.Tensor]]):
        self.layers = layers
        self.num = {n: 0.0 for n in layers}
        self.den = {n: 0.0 for n in layers}
        self._handles = []

    # rows of x per product: the (rows, out) temporaries stay near 64 MiB in fp32 whatever the batch
    CHUNK_ELEMENTS = 1 << 24

    def _hook(self, name):
        lin, W_d = self.layers[name]

        def hook(mod, args):
            x = args[0].detach()
            st = layer_state(lin)
            if st is not None and st.online is not None:  # rotation R4: the input the weights were fitted on
                x = st.online(mod, (x,))[0]
            x = x.reshape(-1, x.shape[-1])  # (N·T, in)
            Wd = W_d.to(device=x.device, dtype=x.dtype)
            delta = Wd - effective_weight(lin).to(x.dtype)  # (out, in)
            rows = max(1, self.CHUNK_ELEMENTS // Wd.shape[0])
            for s in range(0, x.shape[0], rows):
                xs = x[s:s + rows]
                self.num[name] += float(F.linear(xs, delta).float().square().sum())
                self.den[name] += float(F.linear(xs, Wd).float().square().sum())

        return hook

    def __enter__(self) -> "ErrorMeter":
        self._handles = [lin.register_forward_pre_hook(self._hook(n), prepend=True)
                         for n, (lin, _) in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def combine(self, ranks) -> None:
        """Sum the accumulated norms over the ranks that each measured their own samples (distributed.py)."""
        names = list(self.layers)
        t = torch.tensor([self.num[n] for n in names] + [self.den[n] for n in names], dtype=torch.float64)
        t = ranks.all_reduce_(t)
        for k, n in enumerate(names):
            self.num[n], self.den[n] = float(t[k]), float(t[len(names) + k])

    def results(self) -> dict[str, float]:
        return {n: (self.num[n] / self.den[n]) ** 0.5 for n in self.layers if self.den[n] > 0}

    def record(self) -> None:
        """Write the measured errors into the layers' states: `rel_error` becomes the measured value
        and the earlier (one-shot) one is kept as `rel_error_oneshot`."""
        for name, err in self.results().items():
            st = layer_state(self.layers[name][0], create=True)
            if st.rel_error_oneshot is None:
                st.rel_error_oneshot = st.rel_error
            st.rel_error = err
