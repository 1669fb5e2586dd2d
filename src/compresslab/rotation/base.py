"""Rotating a model's residual stream, attention values and MLP input, exactly (the `rotation` group).

With orthogonal Q, a pre-norm transformer computes the same function after (QuaRot, Ashkboos et al.
2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"; SpinQuant, Liu et al. 2024):
- fusion: each RMSNorm's scale w folded into the Linears that read it, W ← W diag(w), w ← 1 (the
  final norm's into the head; a tied head is untied first). RMSNorm without a scale commutes with
  Q: rms(xQ) = rms(x), so norm(xQ) = norm(x) Q.
- R1 (hidden × hidden), the residual stream x ← x Q: embeddings E ← E Q; readers W ← W Q;
  writers W ← Qᵀ W (bias b ← b Q); head W ← W Q.
- R2 (head_dim × head_dim, per block), the values of every head v ← v R: v_proj's rows of each
  KV head W_h ← Rᵀ W_h (b_h ← b_h R); attention mixes tokens only, so o_proj's columns of each
  head take W_:,h ← W_:,h R.
- R4 (intermediate × intermediate), down_proj's input p ← p H with a Hadamard H applied online (a
  forward pre-hook, `OnlineHadamard`) and down_proj's weight W ← W H.
Outlier channels of the residual and of down_proj's input are spread over all channels, so the
weights and the activations that later stages quantize have smaller ranges.

Rotations are computed in float64 and written back in the model's dtype.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import ResidualLayout, adapter_for
from ..stages import layer_state
from ..utils import get_module
from .hadamard import Orthogonal, base_order, hadamard_transform

log = logging.getLogger(__name__)


class OnlineHadamard:
    """Forward pre-hook x ← x H/√n on the last dimension (R4), in float32 at least."""

    def __init__(self, n: int):
        if base_order(n) is None:
            raise ConfigError(f"no Hadamard matrix of order {n} is known (n = K·2^m with K from Paley's "
                              "constructions); set rotation.online_down=false to skip R4 for this model")
        self.n = n

    def __call__(self, module, args):
        x = args[0]
        y = hadamard_transform(x.float() if x.element_size() < 4 else x).to(x.dtype)
        return (y, *args[1:])

    def spec(self) -> dict:
        return {"kind": "hadamard", "n": self.n}

    @classmethod
    def from_spec(cls, spec: dict) -> "OnlineHadamard":
        if spec.get("kind") != "hadamard":
            raise ConfigError(f"unknown online transform {spec!r} in the checkpoint")
        return cls(int(spec["n"]))

    def __repr__(self):
        return f"OnlineHadamard({self.n})"


def layout(model: nn.Module) -> ResidualLayout:
    """The family's residual layout (models/adapters.py), or a ConfigError naming what is missing."""
    adapter = adapter_for(model)
    lay = adapter.residual
    if lay is None:
        raise ConfigError(f"rotations need the residual layout of the family (its norms, the Linears that read and "
                          f"write the residual), written for llama, mistral, qwen2 and smollm3 in models/adapters.py; "
                          f"{adapter.family} has none. LayerNorm families (OPT, GPT-2, NeoX, Falcon) subtract the "
                          f"mean, which a rotation does not commute with; Gemma's and OLMo-2's norms on the branch "
                          f"outputs neither. Use rotation=null for this model")
    blocks = adapter.block_list(model)
    for i, block in enumerate(blocks):
        for name in [n for _, readers in lay.norms for n in readers] + list(lay.writers):
            if not isinstance(get_module(block, name), nn.Linear):
                raise ConfigError(f"rotation: block {i} has no Linear '{name}' (a Mixture-of-Experts block, or a "
                                  f"layout models/adapters.py does not describe); use rotation=null")
    return lay


def check_model(model: nn.Module) -> None:
    """What a rotation cannot do fails here (also on the meta twin, before loading)."""
    lay = layout(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "num_hidden_layers", None) is not None:
        head_dim = _head_dim(model)
        if head_dim is None:
            raise ConfigError("rotation: cannot tell the head width of this model (config.head_dim)")


def _head_dim(model: nn.Module) -> int | None:
    cfg = model.config
    d = getattr(cfg, "head_dim", None)
    if d is None and getattr(cfg, "num_attention_heads", None):
        d = cfg.hidden_size // cfg.num_attention_heads
    return d


def _check_rmsnorm(name: str, norm: nn.Module) -> torch.Tensor:
    """The norm's scale, after checking that norm(x) = w ⊙ x / rms(x) (no mean subtraction, no bias,
    no 1 + w): the one norm a rotation commutes with once w is folded away."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise ConfigError(f"rotation: {name} ({type(norm).__name__}) is not an RMSNorm with a scale vector; "
                          "use rotation=null for this model")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.shape[0], generator=g) * 10 + 3).to(w.device, w.dtype)  # large: eps negligible
    with torch.no_grad():
        got = norm(x).double()
    xd = x.double()
    want = w.double() * xd / xd.pow(2).mean(-1, keepdim=True).sqrt()
    err = ((got - want).norm() / want.norm()).item()
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    if not err < tol:
        raise ConfigError(f"rotation: {name} ({type(norm).__name__}) does not compute w ⊙ x / rms(x) "
                          f"(relative difference {err:.2g}): a rotation does not commute with it; use rotation=null")
    return w


def _untie_head(model: nn.Module, lay: ResidualLayout) -> bool:
    """Give the head its own weight when it shares the embeddings' (its rotation differs). True if it did."""
    head, embed = get_module(model, lay.head), get_module(model, lay.embed)
    if head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False  # a save/load (or tie_weights) keeps them apart
    return True


@torch.no_grad()
def fuse_norms(model: nn.Module) -> dict:
    """Fold every RMSNorm scale of the layout into the Linears that read it (norm weights become 1);
    untie the head. The model computes the same function."""
    lay = layout(model)
    adapter = adapter_for(model)
    pairs = [(f"{adapter.blocks}.{i}.{norm}", get_module(b, norm), [get_module(b, r) for r in readers])
             for i, b in enumerate(adapter.block_list(model)) for norm, readers in lay.norms]
    pairs.append((lay.final_norm, get_module(model, lay.final_norm), [get_module(model, lay.head)]))
    scales = [_check_rmsnorm(name, norm).double() for name, norm, _ in pairs]  # all checked before any change
    untied = _untie_head(model, lay)  # (the head module stays; it gets its own weight)
    for (name, norm, readers), w in zip(pairs, scales):
        for lin in readers:
            lin.weight.data.copy_((lin.weight.double() * w[None, :]).to(lin.weight.dtype))
        norm.weight.data.fill_(1.0)
    return {"untied_head": untied}


def as_orthogonal(Q) -> Orthogonal:
    return Q if isinstance(Q, Orthogonal) else Orthogonal(Q.double())


def _right(W: torch.Tensor, Q: Orthogonal) -> None:
    """W ← W Q (rotate the input side), in place, through float64."""
    W.copy_(Q.right(W))


def _left(W: torch.Tensor, Q: Orthogonal) -> None:
    """W ← Qᵀ W (rotate the output side), in place: (Wᵀ Q)ᵀ."""
    W.copy_(Q.right(W.T).T)


@torch.no_grad()
def rotate(model: nn.Module, R1, R2: list | None, online_down: bool) -> None:
    """Apply R1 to the residual stream, R2[i] to block i's values, and R4 (online Hadamard) to each
    block's MLP input, after `fuse_norms`. Exact: the model computes the same function. R1, R2[i]:
    `Orthogonal`s or (n, n) tensors."""
    lay = layout(model)
    R1 = as_orthogonal(R1) if R1 is not None else None
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    if R1 is not None:
        embed = get_module(model, lay.embed)
        _right(embed.weight.data, R1)
        _right(get_module(model, lay.head).weight.data, R1)
    head_dim = _head_dim(model)
    for i, block in enumerate(blocks):
        if R1 is not None:
            for _, readers in lay.norms:
                for r in readers:
                    _right(get_module(block, r).weight.data, R1)
            for w in lay.writers:
                lin = get_module(block, w)
                _left(lin.weight.data, R1)
                if lin.bias is not None:
                    _right(lin.bias.data[None, :], R1)
        if R2 is not None:
            v, o = (get_module(block, n) for n in lay.values)
            R = as_orthogonal(R2[i].to(v.weight.device) if isinstance(R2[i], torch.Tensor) else R2[i])
            for h in range(v.out_features // head_dim):  # each KV head's rows
                rows = slice(h * head_dim, (h + 1) * head_dim)
                _left(v.weight.data[rows], R)
                if v.bias is not None:
                    _right(v.bias.data[None, rows], R)
            for h in range(o.in_features // head_dim):  # each head's columns of o_proj
                _right(o.weight.data[:, h * head_dim:(h + 1) * head_dim], R)
        if online_down:
            down = get_module(block, lay.mlp_out)
            hook = OnlineHadamard(down.in_features)
            down.weight.data.copy_(hadamard_transform(down.weight.data.double()).to(down.weight.dtype))
            down.register_forward_pre_hook(hook)
            layer_state(down, create=True).online = hook


class Rotation:
    """Base of `rotation=...`: `check(meta_model)` before loading, `apply(model, calibration)` after,
    before the engine; subclasses choose R1 and R2 (`matrices`)."""

    data_parallel = True  # deterministic from the seed: every rank rotates alike

    def __init__(self, seed: int = 0, online_down: bool = True):
        if not isinstance(online_down, bool):
            raise ConfigError(f"rotation.online_down must be true or false, got {online_down!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"rotation.seed must be an int, got {seed!r}")
        self.seed, self.online_down = seed, online_down
        self.report: dict = {}  # what `matrices` measured (a learned rotation's losses), into metrics

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, model: nn.Module) -> None:
        check_model(model)
        if self.online_down:
            lay = layout(model)
            for block in adapter_for(model).block_list(model)[:1]:
                OnlineHadamard(get_module(block, lay.mlp_out).in_features)

    def matrices(self, model: nn.Module, calibration=None, output_dir=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def apply(self, model: nn.Module, calibration=None, output_dir=None) -> dict:
        """Rotate `model` in place; returns metrics (time, what was done). `output_dir`: where a learned
        rotation is saved."""
        t0 = time.perf_counter()
        self.check(model)
        info = fuse_norms(model)
        if self.online_down:  # R4 first: a learned rotation (SpinQuant) trains with it in place
            rotate(model, None, None, True)
        R1, R2 = self.matrices(model, calibration, output_dir)
        rotate(model, R1, R2, False)
        dt = time.perf_counter() - t0
        log.info("rotation %s: %.1f s (R1 %s, R2 %s, R4 %s)", type(self).__name__, dt, tuple(R1.shape),
                 tuple(R2[0].shape) if R2 else None, "online Hadamard" if self.online_down else "off")
        return {"time/rotation_s": dt, "rotation/untied_head": float(info["untied_head"]), **self.report}
