"""The adapter of a decoder-only model that has no hand-written one, found by tracing it.

One forward of a few tokens through a twin of the model built on the meta device (no memory, no
weights, any size) tells everything `Adapter` holds:

- the blocks: the `nn.ModuleList` of `config.num_hidden_layers` repeated layers (the outermost one);
- the inputs: the modules that run before block 0 (embeddings, rotary, dropout), outermost only;
- the outputs: the modules that run after the last block (final norm, head), in call order;
- the Linear groups of a block: Linears that read the same input tensor share a group (they share a
  Hessian: q/k/v, gate/up, or attention and MLP of a parallel block reading one norm's output), and
  groups are ordered by first use, which is the true-sequential order the engine compresses in.

Blocks may differ (DeepSeek-V3's first layers are dense, the rest Mixture-of-Experts): the groups
are the union of every block's, each block's order kept, and a block skips the groups it lacks.
Fused MoE experts are one MLP of Linears per expert by the time this runs (models/moe.py): their
groups are per expert ([experts.e.gate_proj, experts.e.up_proj], [experts.e.down_proj]), since each
reads its own routed tokens. A router stays dense unless `engine.moe_router=compress` made its
projection a Linear (then it groups with the other readers of the MoE block's input).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import get_module

TRACE_TOKENS = 8


def meta_twin(config) -> nn.Module:
    """The causal LM of `config`, built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    import copy

    from . import as_linears

    config = copy.deepcopy(config)  # from_config writes to it (dtype, attention backend)
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        config._attn_implementation = "eager"  # flash / flex kernels do not run on meta tensors
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config)
    as_linears(twin)  # as the loaders do (GPT-2 style Conv1D, fused MoE experts)
    return twin


def find_blocks(model: nn.Module, config) -> str:
    """Dotted path of the ModuleList of decoder blocks: the outermost one with num_hidden_layers
    members of one class (the largest ModuleList when the config does not say)."""
    n_layers = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                       "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1]
    if n_layers is not None:
        matching = [(name, mod) for name, mod in lists if len(mod) == n_layers]
        lists = matching or lists
    if not lists:
        raise ConfigError(f"unsupported architecture {type(model).__name__}: no ModuleList of repeated blocks found, so compresslab cannot "
                          f"tell where the decoder layers are; add an adapter in src/compresslab/models/adapters.py")
    lists.sort(key=lambda nm: (nm[0].count("."), -len(nm[1])))
    return lists[0][0]


def _trace(twin: nn.Module, blocks_path: str):
    """Run the twin on TRACE_TOKENS meta tokens. Returns (module names in first-call order, the
    position in that order where block 0 starts and where the last block ends, and per block the
    [(local Linear name, input tensor)] of each Linear's first call)."""
    blocks = twin.get_submodule(blocks_path)
    block_of = {}  # module -> (block index, local name)
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            block_of[mod] = (i, name)
    calls: list[str] = []
    first_seen: set[str] = set()
    linears: list[list[tuple[str, torch.Tensor]]] = [[] for _ in blocks]
    marks = {}
    handles = []

    def pre(name, mod):
        def hook(m, args, kwargs):
            if name not in first_seen:
                first_seen.add(name)
                calls.append(name)
            if mod is blocks[0] and "start" not in marks:
                marks["start"] = len(calls) - 1
            if isinstance(m, nn.Linear) and m in block_of:
                i, local = block_of[m]
                x = args[0] if args else next(iter(kwargs.values()))
                if all(local != n for n, _ in linears[i]):
                    linears[i].append((local, x))  # the tensor itself: ids stay unique while it lives
        return hook

    def post_last(m, args, out):
        marks["end"] = len(calls)

    for name, mod in twin.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name, mod), with_kwargs=True))
    handles.append(blocks[-1].register_forward_hook(post_last))
    ids = torch.zeros(1, TRACE_TOKENS, dtype=torch.long, device="meta")
    # A full 4-D mask skips transformers' mask construction, which reads values (.item()) that meta
    # tensors do not have; families that build their own mask take none.
    mask = torch.ones(1, 1, TRACE_TOKENS, TRACE_TOKENS, dtype=torch.bool, device="meta")
    errors = []
    try:
        for kwargs in ({"attention_mask": mask}, {}):
            calls.clear(), first_seen.clear(), marks.clear()
            for lst in linears:
                lst.clear()
            try:
                with torch.no_grad():
                    twin(input_ids=ids, use_cache=False, **kwargs)
                break
            except Exception as e:  # noqa: BLE001 - the next way, or the reason below
                errors.append(f"{type(e).__name__}: {e}")
        else:
            raise ConfigError(f"unsupported architecture {type(twin).__name__}: could not trace a forward on the meta device to find its "
                              f"layers ({'; '.join(errors)}); add an adapter in src/compresslab/models/adapters.py")
    finally:
        for h in handles:
            h.remove()
    return calls, marks["start"], marks.get("end", len(calls)), linears


def _outermost(names: list[str], exclude: str) -> tuple[str, ...]:
    """Names that are neither an ancestor of `exclude` (the containers that call the blocks) nor
    inside another listed name, in the given order."""
    def inside(a, b):
        return b == "" or a.startswith(b + ".")

    keep = [n for n in names if n and not inside(exclude, n) and not inside(n, exclude) and n != exclude]
    return tuple(n for n in keep if not any(inside(n, o) for o in keep if o != n))


def _groups(layout: list[tuple[str, torch.Tensor]]) -> tuple[tuple[str, ...], ...]:
    by_input: dict[int, list[str]] = {}
    for name, x in layout:  # first-use order: dicts keep insertion order
        by_input.setdefault(id(x), []).append(name)
    return tuple(tuple(g) for g in by_input.values())


def _scalar_gate(m: nn.Module) -> bool:
    """A Linear of one output (Qwen2-MoE's shared_expert_gate: a sigmoid gate on a whole branch) stays
    dense: nothing to gain, and its error would scale the branch."""
    return isinstance(m, nn.Linear) and m.out_features == 1


def _union(layouts: list[tuple[tuple[str, ...], ...]]) -> tuple[tuple[str, ...], ...]:
    """The groups of blocks that differ (DeepSeek-V3's first dense layers, Qwen-MoE's dense-only
    layers) merged into one list that keeps each block's own order; a block skips the groups it lacks."""
    union: list[tuple[str, ...]] = []
    for layout in layouts:
        at = -1
        for g in layout:
            if g in union:
                at = union.index(g)
            else:
                at += 1
                union.insert(at, g)
    return tuple(union)


def _waves(groups, blocks) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...] | None]:
    """(groups, wave of each group): the groups of the experts of one MoE module that play the same part
    (every expert's gate/up, then every expert's down) made consecutive and given one wave: their inputs
    do not depend on each other's compression (expert e's tokens and gate/up are its own), so the
    engine's chunked path may observe a whole wave in one pass. Other groups are waves of one."""
    from .moe import LinearExperts

    def key(group):
        owner, _, index = group[0].rpartition(".")[0].rpartition(".")  # mlp.experts.3.gate_proj -> mlp.experts, 3
        if index.isdigit() and owner and any(isinstance(get_module(b, owner), LinearExperts) for b in blocks):
            return owner, tuple(n.rpartition(".")[2] for n in group)
        return None

    buckets: list[tuple[object, list]] = []
    for g in groups:
        k = key(g)
        hit = next((b for kb, b in buckets if k is not None and kb == k), None)
        if hit is None:
            buckets.append((k, [g]))
        else:
            hit.append(g)
    if all(len(b) == 1 for _, b in buckets):
        return groups, None
    ordered = tuple(g for _, b in buckets for g in b)
    return ordered, tuple(w for w, (_, b) in enumerate(buckets) for _ in b)


def discover(model_or_config):
    """An `Adapter` for a model (or config) with no hand-written one. See the module doc."""
    from .adapters import Adapter
    from .moe import dense_routers, has_linear_routers, linear_routers

    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", type(config).__name__)
    try:
        twin = meta_twin(config)
        if isinstance(model_or_config, nn.Module) and has_linear_routers(model_or_config):
            linear_routers(twin)  # engine.moe_router=compress: trace the routers' projections too
    except Exception as e:  # noqa: BLE001 - e.g. not a causal LM, or not a transformers config
        raise ConfigError(f"unsupported architecture '{model_type}': transformers cannot build it as a causal LM "
                          f"on the meta device ({type(e).__name__}: {str(e).splitlines()[0][:160]}); compresslab compresses decoder-only "
                          f"models (add an adapter in src/compresslab/models/adapters.py)") from None
    blocks_path = find_blocks(twin, config)
    odd = sorted({n.split(".", 1)[1] for n, p in twin.get_submodule(blocks_path).named_parameters() if p.dim() > 2})
    if odd:  # e.g. transformers 5's fused experts, (E, 2I, H) and (E, H, I), or a convolution: not Linears
        what = ("Mixture-of-Experts weights of a layout compresslab cannot split into Linears"
                if any("expert" in n for n in odd) else "weights of more than 2-D")
        raise ConfigError(f"unsupported architecture '{model_type}': its blocks hold {what} {odd}, which compresslab "
                          f"does not compress yet (they would stay dense)")
    calls, start, end, linears = _trace(twin, blocks_path)
    blocks = twin.get_submodule(blocks_path)
    dense = [dense_routers(b) for b in blocks]  # Linear routers stay dense unless asked (models/moe.py)
    layouts = [_groups([(n, x) for n, x in layout if not _scalar_gate(blocks[i].get_submodule(n)) and n not in dense[i]])
               for i, layout in enumerate(linears)]
    if not any(layouts):
        raise ConfigError(f"unsupported architecture '{model_type}': its blocks ('{blocks_path}') call no nn.Linear, so there is "
                          f"nothing compresslab can compress; add an adapter in src/compresslab/models/adapters.py")
    for i, layout in enumerate(layouts):
        called = {n for g in layout for n in g}
        missed = sorted(n for n, m in blocks[i].named_modules()
                        if isinstance(m, nn.Linear) and n not in called and not _scalar_gate(m) and n not in dense[i])
        if missed:  # a Linear the forward never calls would silently stay dense
            raise ConfigError(f"unsupported architecture '{model_type}': Linears {missed} in block {i} are never called by its "
                              f"forward; add an adapter in src/compresslab/models/adapters.py")
    groups, waves = _waves(_union(layouts), blocks)
    if any(set(a) & set(b) for a in groups for b in groups if a != b):
        raise ConfigError(f"unsupported architecture '{model_type}': its blocks group the same Linears differently "
                          f"({groups}); add an adapter in src/compresslab/models/adapters.py")
    return Adapter(
        family=str(model_type),
        blocks=blocks_path,
        inputs=_outermost(calls[:start], blocks_path),
        groups=groups,
        waves=waves,
        outputs=_outermost(calls[end:], blocks_path),
        discovered=True,
    )
