"""Per-family adapters: where the blocks are, what runs before them, and the Linear groups.

This is the only place that knows model families. The engine asks `adapter_for(model)` and
never looks at class names. A family without an entry in `_ADAPTERS` gets the adapter that
models/discover.py finds by tracing the model; an entry here is for what tracing cannot know (see
each one).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import get_module


@dataclass(frozen=True)
class ResidualLayout:
    """Where a rotation of the residual stream (rotation/) must act, for pre-norm blocks
    x + attn(norm1(x)), h + mlp(norm2(h)) with RMSNorms. Names are relative to the CausalLM (embed,
    final_norm, head) or to a block (the rest)."""

    embed: str  # the token embedding: its rows are residual vectors
    final_norm: str  # the norm before the head
    head: str  # the LM head: reads the final norm's output
    norms: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, the Linears that read its output)
    writers: tuple[str, ...]  # Linears whose output is added to the residual
    values: tuple[str, str]  # (v_proj, o_proj): per-head rotation of the attention values
    mlp_out: str  # the MLP's last Linear (its input may take an online Hadamard)


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: str  # dotted path from the CausalLM to the ModuleList of blocks
    inputs: tuple[str, ...]  # modules that run before block 0 (embeddings, rotary); missing ones are skipped
    groups: tuple[tuple[str, ...], ...]  # Linear groups in a block, true-sequential order; a group shares one input
    # the block's gated MLP, down(act(gate(x)) * up(x)), as (module, gate, up, down, act) names: run
    # leaner during no-grad forwards (see `lean`); None: the block runs as the family wrote it
    gated_mlp: tuple[str, str, str, str, str] | None = None
    # modules that turn the last block's output into logits, in order (final norm, head); missing
    # ones (None in some configs) are skipped. Used where blocks are streamed (stream.StreamedModel)
    outputs: tuple[str, ...] = ()
    # the block ends in a residual MLP branch, block(x) = h + mlp(norm(h)), as (norm, mlp) names, h being
    # the norm's input: the engine's chunked path keeps h and runs only the branch for the MLP's groups
    # and the propagation (see `mlp_branch`); None: the block is run whole
    residual_mlp: tuple[str, str] | None = None
    # the Linear whose output the block adds to its input to make that residual, h = x + o_proj(a), a
    # group of its own: the chunked path keeps its input a and computes h from it instead of running the
    # attention again (see `residual_writer`); None: h is reached by running the block up to the norm
    residual_attn: str | None = None
    # the Linear whose output is the branch's, block(x) = h + down_proj(p), a group of its own and the branch's
    # last: when the memory plan has room for its (N, T, I) input, the chunked path keeps p during its
    # statistics pass and the outputs are h + down_proj(p) (see `mlp_writer`): gate/up run once per chunk
    residual_mlp_out: str | None = None
    # found by tracing the model (models/discover.py) rather than written here
    discovered: bool = False
    # per group (aligned with `groups`), its wave: consecutive groups of one wave read inputs that the
    # others' compression does not change (the experts of an MoE block), so the chunked path observes
    # them in one pass; None: every group is a wave of its own
    waves: tuple[int, ...] | None = None
    # where a rotation of the residual stream acts (rotation/); None: rotations refuse the family
    residual: ResidualLayout | None = None

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = get_module(model, self.blocks)
        if blocks is None:
            raise ConfigError(f"{self.family} adapter: no '{self.blocks}' in {type(model).__name__}")
        return blocks

    def input_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (get_module(model, p) for p in self.inputs) if m is not None]

    def output_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (get_module(model, p) for p in self.outputs) if m is not None]

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """[[(name, Linear), ...], ...] for one block, in true-sequential order."""
        out = []
        for group in self._present(block):
            members = []
            for name in group:
                mod = get_module(block, name)
                if not isinstance(mod, nn.Linear):
                    hint = (" (a GPT-2 style Conv1D: compresslab.models.conv1d.conv1d_to_linear(model) turns it into "
                            "one, as model=hf does at load)") if type(mod).__name__ == "Conv1D" else ""
                    raise ConfigError(f"{self.family} adapter: '{name}' is not an nn.Linear in "
                                      f"{type(block).__name__}{hint}")
                members.append((name, mod))
            out.append(members)
        return out

    @contextlib.contextmanager
    def lean(self, block: nn.Module):
        """Within this context a no-grad forward of `block` holds less: the gated MLP computes
        act(gate(x)) in place (row slices, any activation) and multiplies up(x) into it, so its peak is
        two (tokens, intermediate) tensors instead of three; when nothing hooks `up`, up(x) goes in row
        slices of LEAN_ROWS tokens, so the peak is one. Elementwise ops on the same values, and a
        Linear on row slices (the same dot products: bitwise equal on this CPU for slices of >= 512
        rows; the activation in slices of whole 64-element runs, so that its scalar tail is the family
        forward's); hooks see what the family's forward gives them. Forwards with grad run unchanged."""
        mlp = get_module(block, self.gated_mlp[0]) if self.gated_mlp else None
        if mlp is None or "forward" in vars(mlp):
            yield
            return
        mlp.forward = types.MethodType(_lean_gated_forward(*self.gated_mlp[1:], type(mlp).forward), mlp)
        try:
            yield
        finally:
            del mlp.forward

    def _present(self, block: nn.Module) -> list[tuple[str, ...]]:
        """The groups of `block`: blocks that differ (models/discover.py) skip the groups they lack."""
        if not self.discovered:
            return list(self.groups)
        return [g for g in self.groups if any(get_module(block, name) is not None for name in g)]

    def group_waves(self, block: nn.Module) -> list[list[int]]:
        """Indices into `linear_groups(block)`, split into waves (see `waves`), in order."""
        present = self._present(block)
        ids = [self.waves[self.groups.index(g)] for g in present] if self.waves else list(range(len(present)))
        out: list[list[int]] = []
        for k, w in enumerate(ids):
            if out and ids[k - 1] == w:
                out[-1].append(k)
            else:
                out.append([k])
        return out

    def calibrating(self, block: nn.Module, mode: str = "routed", min_tokens: int = 1, routed=None, reduce=None):
        """Context of a calibration forward of `block`: its Mixture-of-Experts experts take their
        statistics from their routed tokens or all of them (models/moe.py); nothing for dense blocks.
        `routed`: what `routing` counted, when the calibration runs in chunks; `reduce`: sums a
        forward's counts over the ranks (distributed.py)."""
        from .moe import calibrating

        return calibrating(block, mode, min_tokens, routed, reduce)

    def routing(self, block: nn.Module):
        """Context that counts where the block's routers send each token (models/moe.py); yields the counts."""
        from .moe import routing

        return routing(block)

    def mlp_branch(self, block: nn.Module):
        """(norm, mlp, names of the groups inside mlp) when the block ends in h + mlp(norm(h)), else None."""
        if self.residual_mlp is None:
            return None
        norm, mlp = (get_module(block, n) for n in self.residual_mlp)
        if norm is None or mlp is None:
            return None
        prefix = self.residual_mlp[1] + "."
        inside = {i for i, g in enumerate(self.groups) if all(n.startswith(prefix) for n in g)}
        if not inside or inside != set(range(min(inside), len(self.groups))):  # the branch's groups come last
            return None
        return norm, mlp, inside

    def residual_writer(self, block: nn.Module):
        """(index of its group, name) of the Linear with h = x + lin(a) (`residual_attn`) when the block
        also has its residual MLP branch and that Linear is a group of its own before the branch's
        groups, else None."""
        branch = self.mlp_branch(block)
        if self.residual_attn is None or branch is None or get_module(block, self.residual_attn) is None:
            return None
        g = next((i for i, names in enumerate(self.groups) if names == (self.residual_attn,)), None)
        return (g, self.residual_attn) if g is not None and g < min(branch[2]) else None

    def mlp_writer(self, block: nn.Module):
        """(index of its group, name) of the Linear with block(x) = h + lin(p) (`residual_mlp_out`) when it
        is the residual MLP branch's last group and a group of its own, else None."""
        branch = self.mlp_branch(block)
        if self.residual_mlp_out is None or branch is None or get_module(block, self.residual_mlp_out) is None:
            return None
        g = max(branch[2])
        return (g, self.residual_mlp_out) if self.groups[g] == (self.residual_mlp_out,) else None

    def named_linears(self, model: nn.Module):
        """(qualified name, Linear) for every target Linear of every block."""
        for i, block in enumerate(self.block_list(model)):
            for group in self.linear_groups(block):
                for name, lin in group:
                    yield f"{self.blocks}.{i}.{name}", lin


LEAN_ROWS = 4096  # rows per in-place activation slice (a slice's temporary is rows x intermediate)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_forward_hooks)


def _lean_gated_forward(gate: str, up: str, down: str, act: str, plain):
    def forward(mlp, x):
        if torch.is_grad_enabled():  # training needs the activation's input: the family's own forward
            return plain(mlp, x)
        h = getattr(mlp, gate)(x)  # (..., I)
        fn, upm = getattr(mlp, act), getattr(mlp, up)
        flat = h.view(-1, h.shape[-1])
        # the activation on slices of whole 64-element runs: a vectorized elementwise kernel computes the
        # last len % 16 (or % 32) elements of a call on its scalar path, which for e.g. tanh-GELU differs
        # from the vector path in the last bit, so slices of whole rows would move those tails
        elems, step = h.view(-1), max(64, LEAN_ROWS * h.shape[-1] // 64 * 64)
        for i in range(0, elems.numel(), step):
            elems[i:i + step] = fn(elems[i:i + step])
        if _hooked(upm) or flat.shape[0] <= LEAN_ROWS:  # a hook sees up's whole input, as the family calls it
            h.mul_(upm(x))
        else:  # up row slice by row slice into h: one (tokens, I) tensor instead of two
            xs = x.reshape(-1, x.shape[-1])
            for i in range(0, flat.shape[0], LEAN_ROWS):
                flat[i:i + LEAN_ROWS].mul_(upm(xs[i:i + LEAN_ROWS]))
        return getattr(mlp, down)(h)

    return forward


_LLAMA = Adapter(
    family="llama",
    blocks="model.layers",
    inputs=("model.embed_tokens", "model.rotary_emb"),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    gated_mlp=("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"),
    outputs=("model.norm", "lm_head"),
    residual_mlp=("post_attention_layernorm", "mlp"),
    residual_attn="self_attn.o_proj",
    residual_mlp_out="mlp.down_proj",
    residual=ResidualLayout(
        embed="model.embed_tokens", final_norm="model.norm", head="lm_head",
        norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        values=("self_attn.v_proj", "self_attn.o_proj"),
        mlp_out="mlp.down_proj",
    ),
)
# config.model_type -> adapter, for what tracing (models/discover.py) cannot know. These families'
# blocks are x + attn(norm(x)) then h + mlp(norm(h)) with a gated MLP: the lean MLP forward and the
# chunked path's residual shortcuts rely on that dataflow, which a trace of the Linears' inputs does
# not show (OLMo-2 normalises the branch outputs instead, so the shortcuts would be wrong there). Their
# groups are the traced ones (tests/models/test_discover.py checks it); every other family is traced.
_ADAPTERS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "smollm3": _LLAMA,
}


def adapter_for(model_or_config) -> Adapter:
    """The hand-written adapter of the model's family, else the one `discover` finds by tracing it
    (kept on the model, so a model is traced once)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    cached = getattr(model_or_config, "_compresslab_adapter", None) if isinstance(model_or_config, nn.Module) else None
    if cached is not None:
        return cached
    from .discover import discover

    adapter = discover(model_or_config)
    if isinstance(model_or_config, nn.Module):
        model_or_config.__dict__["_compresslab_adapter"] = adapter
    return adapter
