"""Mixture-of-Experts: transformers' fused experts as one small MLP of `nn.Linear`s per expert.

transformers 5 keeps the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE and most other MoE
families as two fused 3-D parameters, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) (or
transposed, with biases, or without a gate; its `use_experts_implementation` decorator records
which). Every stage compresses `nn.Linear`s, so right after loading `unfuse_experts` replaces each
fused experts module by `LinearExperts`: expert e is `gate_proj` / `up_proj` / `down_proj` Linears
holding its slices, and the forward routes each token to its top-k experts exactly as the family's
eager forward does (the same outputs to float rounding). From there on an expert is three ordinary
layers: its own Hessian, mask, codes and packed-checkpoint entry (`mlp.experts.3.down_proj`).

Calibration (`calibrating`): expert e's statistics come from the tokens the router sends it
(`routed`), or from every token (`all`: each expert also runs on all tokens, its outputs still taken
only for its routed tokens). An expert routed fewer than `min_tokens` tokens in a calibration forward
is "starved": it sees every token of that forward instead (the rule peers adopted after routed-only
calibration left rare experts with no statistics at all); the count is over the whole calibration
set, also when the memory plan runs it in chunks (a routing pass counts first). Each expert's Linears record how many
tokens were routed to them and where their statistics came from (`LayerState.tokens`, `stats_from`).

Routers (`linear_routers`, `engine.moe_router=compress`): the router stays dense by default, as the
family wrote it (a bare (E, H) weight in every family here, or a Linear sitting beside the experts,
which discovery leaves out). Asked to compress it, its projection becomes an `nn.Linear` child `proj`
(`mlp.gate.proj`) that every stage compresses like any layer of the MoE block's input; the family's
own routing code still runs, on `proj(x)` zero-padded to H columns against a fixed [I | 0] weight,
which reproduces the logits exactly (one nonzero product per output). A family that computes its
logits in fp32 from a bf16 model (DeepSeek-V3) then sees them rounded to the model dtype first.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MOE_CALIBRATION = ("routed", "all")
MOE_ROUTER = ("dense", "compress")
ROUTER_FLAG = "_compresslab_router"  # set on a router asked to be compressed (kept by deepcopy)


def _is_fused_experts(m: nn.Module) -> bool:
    """transformers' fused experts: a module of 3-D `down_proj` and `gate_up_proj` (or `up_proj`)
    parameters, its layout flags set by `use_experts_implementation`."""
    down = getattr(m, "down_proj", None)
    up = getattr(m, "gate_up_proj", None) if getattr(m, "has_gate", True) else getattr(m, "up_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and isinstance(up, nn.Parameter) and up.dim() == 3
            and hasattr(m, "is_transposed"))


def has_fused_experts(model: nn.Module) -> bool:
    return any(_is_fused_experts(m) for m in model.modules())


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)) (up only when the family's experts have no gate)."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj, self.down_proj = up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, H) -> (S, H)
        owner = self.__dict__["_owner"]
        return self.down_proj(owner.activate(self, x))


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block as a list of `ExpertMLP`s; called as the family's fused experts are,
    experts(hidden (S, H), top_k_index (S, k), top_k_weights (S, k)) -> (S, H).

    The family's activation and gating function (`act_fn`, `_apply_gate`) are kept off the module list."""

    def __init__(self, experts: list[ExpertMLP], act_fn, apply_gate=None, concatenated: bool = True):
        super().__init__(experts)
        vars(self).update(_act=act_fn, _apply_gate=apply_gate, _concat=concatenated, _calib=None)
        for e in experts:
            vars(e)["_owner"] = self

    @property
    def num_experts(self) -> int:
        return len(self)

    def activate(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        """(S, I): act(gate(x)) * up(x), or the family's own gating function of the fused gate_up output."""
        if not hasattr(expert, "gate_proj"):
            return self._act(expert.up_proj(x))
        gate = expert.gate_proj(x)
        up = expert.up_proj(x)
        if self._apply_gate is None:
            return self._act(gate) * up
        fused = torch.cat([gate, up], -1) if self._concat else torch.stack([gate, up], -1).flatten(-2)
        return self._apply_gate(fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        if hidden_states.is_meta:  # a trace (models/discover.py): every expert once, each on its own input
            for expert in self:
                expert(hidden_states.clone())
            return out
        calib = self._calib
        with torch.no_grad():
            counts = torch.bincount(top_k_index.flatten(), minlength=len(self) + 1)[: len(self)].tolist()
        starved = set()
        if calib is not None:  # whole-set counts from a routing pass when chunked; else this forward has all tokens
            # (of this rank: summed over the ranks when several share the calibration set)
            basis = calib["routed"] if calib["routed"] is not None else calib["reduce"](counts)
            calib["basis"] = basis
            if calib["mode"] == "routed":
                starved = {e for e, c in enumerate(basis) if c < calib["min_tokens"]}
            calib["starved"] |= starved
            for e, c in enumerate(counts):
                calib["counts"][e] += c
        for e, expert in enumerate(self):
            everyone = calib is not None and (calib["mode"] == "all" or e in starved)
            if not counts[e] and calib is None:
                continue  # in calibration every expert runs, on no tokens too: its statistics' hooks fire on every rank
            token_idx, pos = torch.where(top_k_index == e)  # (n_e,): the tokens routed to e, and in which slot
            if everyone:  # statistics from every token; the output only where the router sent it
                y = expert(hidden_states)[token_idx]
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _linear(w: torch.Tensor, b: torch.Tensor | None, grad: bool) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    # contiguous: a transposed layout's slice is a strided view; trainable as the fused tensor was
    lin.weight = nn.Parameter(w.detach().contiguous().clone(), requires_grad=grad)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().contiguous().clone(), requires_grad=grad)
    return lin


@torch.no_grad()
def linear_experts(fused: nn.Module) -> LinearExperts:
    """The `LinearExperts` equal to a fused experts module (its tensors sliced and copied)."""
    if getattr(fused, "has_post_expert_norm", False):
        raise ConfigError(f"{type(fused).__name__}: experts with a norm after each expert are not supported yet")
    has_gate, transposed = getattr(fused, "has_gate", True), fused.is_transposed
    concat = getattr(fused, "is_concatenated", True)
    up_w = fused.gate_up_proj if has_gate else fused.up_proj
    up_b = getattr(fused, "gate_up_proj_bias" if has_gate else "up_proj_bias", None) if fused.has_bias else None
    down_b = getattr(fused, "down_proj_bias", None) if fused.has_bias else None
    experts, grad = [], up_w.requires_grad
    for e in range(up_w.shape[0]):
        w = up_w[e].T if transposed else up_w[e]  # (2I, H) or (I, H)
        b = up_b[e] if up_b is not None else None
        if has_gate:
            rows = (slice(0, w.shape[0] // 2), slice(w.shape[0] // 2, None)) if concat else (slice(0, None, 2),
                                                                                             slice(1, None, 2))
            gate = _linear(w[rows[0]], b[rows[0]] if b is not None else None, grad)
            up = _linear(w[rows[1]], b[rows[1]] if b is not None else None, grad)
        else:
            gate, up = None, _linear(w, b, grad)
        dw = fused.down_proj[e].T if transposed else fused.down_proj[e]  # (H, I)
        experts.append(ExpertMLP(gate, up, _linear(dw, down_b[e] if down_b is not None else None, grad)))
    from transformers.integrations import moe as hf_moe

    custom = type(fused)._apply_gate
    if custom is getattr(hf_moe, "_default_apply_gate", None):
        custom = None
    else:  # bound to the module's settings (alpha, limit, act_fn ...) without holding its fused tensors
        import types

        settings = {k: v for k, v in vars(fused).items() if not k.startswith("_")}
        custom = custom.__get__(types.SimpleNamespace(**settings, **fused._modules))
    return LinearExperts(experts, getattr(fused, "act_fn", None), custom, concat)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by its `LinearExperts`, in place (same device and
    dtype, meta included). Returns how many were replaced."""
    todo = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    for name, fused in todo:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear_experts(fused))
        del fused
    return len(todo)


def _through_proj(router: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a router with a `proj` Linear: its input x (..., H) becomes proj(x) zero-padded
    to (..., H), which the router's [I | 0] weight maps back to proj(x) exactly."""
    x = args[0] if args else kwargs["hidden_states"]
    logits = router.proj(x)  # (..., E)
    padded = F.pad(logits, (0, x.shape[-1] - logits.shape[-1]))
    if args:
        return (padded, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": padded}


def _routers(model: nn.Module):
    """(router, experts count, width) of every MoE block: a child of the module holding the
    `LinearExperts` with a 2-D (E, H) `weight` (a bare-weight router, or a Linear one)."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, LinearExperts):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        width = m[0].down_proj.out_features
        for child in parent.children():
            w = child._parameters.get("weight", child._buffers.get("weight"))
            if child is not m and w is not None and tuple(w.shape) == (len(m), width):
                out.append((child, len(m), width))
    return out


@torch.no_grad()
def linear_routers(model: nn.Module) -> int:
    """Make the router of every MoE block of `model` compressible (see the module doc), in place (same
    device and dtype, meta included). A Linear router is only marked; a converted one is left alone.
    Returns how many routers changed."""
    changed = 0
    for router, n, width in _routers(model):
        if vars(router).get(ROUTER_FLAG):
            continue
        vars(router)[ROUTER_FLAG] = True
        changed += 1
        if isinstance(router, nn.Linear):
            continue
        w = router._parameters.pop("weight")
        b = router._parameters.get("bias")
        proj = nn.Linear(width, n, bias=b is not None, device=w.device, dtype=w.dtype)
        proj.weight = w  # the same Parameter (trainable as it was)
        if b is not None:
            proj.bias = router._parameters.pop("bias")
            router.register_buffer("bias", torch.zeros_like(b.detach()), persistent=False)
        router.proj = proj
        router.register_buffer("weight", torch.eye(n, width, dtype=w.dtype, device=w.device), persistent=False)
        router.register_forward_pre_hook(_through_proj, with_kwargs=True)
    if changed:
        model.__dict__.pop("_compresslab_adapter", None)  # traced before: its groups lack the routers
    return changed


def has_linear_routers(model: nn.Module) -> bool:
    return any(vars(m).get(ROUTER_FLAG) for m in model.modules())


def dense_routers(block: nn.Module) -> set[str]:
    """Names (in `block`) of the Linear routers that stay dense: every one not asked to be compressed."""
    ids = {id(r) for r, _, _ in _routers(block) if isinstance(r, nn.Linear) and not vars(r).get(ROUTER_FLAG)}
    return {name for name, m in block.named_modules() if id(m) in ids}


def check_router(mode: str) -> None:
    if mode not in MOE_ROUTER:
        raise ConfigError(f"engine.moe_router={mode!r} is not one of {', '.join(MOE_ROUTER)} (dense: routers stay as "
                          "they are; compress: every stage compresses each MoE router's projection too)")


def check_calibration(mode: str, min_tokens: int) -> None:
    if mode not in MOE_CALIBRATION:
        raise ConfigError(f"engine.moe_calibration={mode!r} is not one of {', '.join(MOE_CALIBRATION)} (routed: each "
                          "expert's statistics from the tokens routed to it; all: from every token)")
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 1:
        raise ConfigError(f"engine.moe_min_tokens={min_tokens!r} must be an int >= 1 (an expert routed fewer tokens "
                          "of the calibration set takes its statistics from all of them)")


@contextlib.contextmanager
def routing(block: nn.Module):
    """Within this context the router's choices for the experts of `block` are counted; yields
    {LinearExperts: [tokens per expert]}, complete once every chunk has run up to the experts (the
    engine's chunked path does this once per block, so that `calibrating` decides on whole-set counts)."""
    counts: dict[nn.Module, list[int]] = {}

    def count(m, args):
        c = torch.bincount(args[1].flatten(), minlength=len(m) + 1)[: len(m)].tolist()
        counts[m] = [a + b for a, b in zip(counts.get(m, [0] * len(m)), c)]

    handles = [m.register_forward_pre_hook(count) for m in block.modules() if isinstance(m, LinearExperts)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def calibrating(block: nn.Module, mode: str = "routed", min_tokens: int = 1,
                routed: dict[nn.Module, list[int]] | None = None, reduce=None):
    """Within this context the experts of `block` calibrate as `mode` says (see the module doc). On
    exit, when the router ran, each expert's Linears record their routed token count and where their
    statistics came from. `routed`: each expert's tokens over the whole calibration set (`routing`),
    when this pass sees it in chunks; without it a forward is taken to hold the whole set (one pass).
    `reduce`: sums a forward's per-expert counts over the ranks sharing the calibration set
    (distributed.py), so that every rank applies the same rule."""
    from ..stages import layer_state

    moes = [m for m in block.modules() if isinstance(m, LinearExperts)]
    for m in moes:
        vars(m)["_calib"] = {"mode": mode, "min_tokens": min_tokens, "routed": (routed or {}).get(m),
                             "counts": [0] * len(m), "starved": set(), "reduce": reduce or (lambda c: c),
                             "basis": None}
    try:
        yield
    finally:
        for m in moes:
            calib, vars(m)["_calib"] = m._calib, None
            if not any(calib["counts"]):  # the forward stopped before the experts
                continue
            for e, expert in enumerate(m):
                source = "all" if mode == "all" else "all (starved)" if e in calib["starved"] else "routed"
                for lin in expert.modules():
                    if isinstance(lin, nn.Linear):
                        st = layer_state(lin, create=True)
                        st.tokens = calib["basis"][e]  # the whole calibration set's count
                        st.stats_from = source
