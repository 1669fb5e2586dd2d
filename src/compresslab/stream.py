"""Streaming: models larger than RAM, one block materialised at a time (`model.offload=disk`).

The engine's loop stays the only loop; streaming gives it a block *source* and a *sink*:

    source.load(i, block)   materialise block i (meta -> CPU) from the checkpoint's safetensors shards
    ... compress, recover, propagate as usual ...
    sink(i, block)          pack the final block into the packed checkpoint (CheckpointWriter)
    source.free(i, block)   back to the meta device: its memory is returned

The model itself is built on the meta device; only what runs outside the blocks (embeddings,
rotary, final norm, head) is materialised, once. Perplexity runs the same way: every eval window's
hidden states pass through one block at a time (`StreamedModel`), the dense baseline from the
original shards, the compressed model from the dense shards plus the packed checkpoint's Linears.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .models.adapters import Adapter, adapter_for
from .stages import STATE_ATTR

log = logging.getLogger(__name__)


class ShardedTensors:
    """A folder's safetensors tensors (model.safetensors, or shards listed in
    model.safetensors.index.json), read by name on demand; nothing else is read."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"model.offload=disk reads safetensors weights, and {self.folder} has neither "
                              "model.safetensors nor model.safetensors.index.json; convert the checkpoint "
                              "(save_pretrained(..., safe_serialization=True)) or use model.offload=null")

        self.name = {k: k for k in self.where}  # model state-dict key -> checkpoint key (see `bind`)

    def bind(self, model: nn.Module) -> None:
        """Map the model's state-dict keys to the checkpoint's through transformers' own checkpoint
        renamings (e.g. GPT-NeoX stores `lm_head` as `embed_out`). A checkpoint whose tensors need
        merging or splitting on load (a WeightConverter, e.g. per-expert MoE weights into fused ones)
        cannot be read block by block here: that fails with the reason."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # an older transformers: names as stored
            return
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_state = model.state_dict()
        names, converted = {}, []
        for key in self.where:
            new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if pattern is not None:
                converted.append(key)
            names[new] = key
        if converted:
            raise ConfigError(f"model.offload=disk: {self.folder} stores tensors that transformers converts on load "
                              f"(e.g. {converted[:2]}), which cannot be read one block at a time; use "
                              "model.offload=null, or re-save the model with save_pretrained and stream that")
        self.name = names

    def __contains__(self, key: str) -> bool:
        return key in self.name

    def get(self, key: str) -> torch.Tensor:
        """The tensor of the model's state-dict `key`, on the CPU. The shard is opened for this read
        and closed again, so no mapping of the file stays resident."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.where[self.name[key]]), framework="pt") as f:
            return f.get_tensor(self.name[key])


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): a streamed run frees a block's worth of tensors
    per block, and glibc's heap otherwise keeps (and fragments) it, so RSS creeps up block by block."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prefer_mmap() -> None:
    """Big allocations straight from the OS and back (glibc M_MMAP_THRESHOLD = 1 MiB, fixed): without
    it glibc raises the threshold after the first large free and serves a block's tensors from a heap
    that does not shrink. Process-wide; a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _fill(module: nn.Module, prefix: str, tensors: ShardedTensors, init_fn, skip: tuple[str, ...] = ()) -> None:
    """Give `module`'s meta tensors their values: each persistent one read from the checkpoint (one at
    a time, cast to the module's dtype, set in place of the meta tensor: no second copy), each
    non-persistent buffer (rotary inv_freq) computed by the model's own initialiser. Tensors already
    materialised (a PackedLinear's) and `skip`ped keys are left alone. A tensor the checkpoint lacks
    is an error, not a random weight."""
    persistent = set(module.state_dict(keep_vars=True))
    todo = []
    for mname, m in module.named_modules():
        for store in (m._parameters, m._buffers):
            for n, t in store.items():
                key = f"{mname}.{n}" if mname else n
                if t is not None and t.is_meta and key not in skip:
                    todo.append((store, n, key, t))
    missing = [prefix + k for _, _, k, _ in todo if k in persistent and prefix + k not in tensors]
    if missing:
        raise ConfigError(f"model.offload=disk: {missing[:3]} are not in the checkpoint {tensors.folder} (its tensor "
                          "names must match the model's state_dict, as save_pretrained writes them); "
                          "use model.offload=null for this checkpoint")
    computed = set()
    for store, n, key, t in todo:  # computed buffers first: their owners' initialiser may touch params (still meta)
        if key not in persistent:
            store[n] = torch.empty_like(t, device="cpu")
            computed.add(key.rpartition(".")[0])
    for owner in computed:
        init_fn(module.get_submodule(owner) if owner else module)
    for store, n, key, t in todo:
        if key in persistent:
            v = tensors.get(prefix + key)
            v = v.to(t.dtype) if v.is_floating_point() else v
            store[n] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v


class DiskBlocks:
    """The block source of a streamed model: block i materialised from the shards, freed after.

    `live` / `max_live` count the blocks materialised at once (the streamed run's memory bound)."""

    def __init__(self, model: nn.Module, tensors: ShardedTensors, adapter: Adapter | None = None):
        self.model, self.tensors = model, tensors
        self.adapter = adapter or adapter_for(model)
        self.live = self.max_live = self.loads = 0

    def prefix(self, i: int) -> str:
        return f"{self.adapter.blocks}.{i}."

    def load(self, i: int, block: nn.Module) -> None:
        _fill(block, self.prefix(i), self.tensors, self.model._init_weights)
        self.live += 1
        self.loads += 1
        self.max_live = max(self.max_live, self.live)

    def free(self, i: int, block: nn.Module) -> None:
        for m in block.modules():  # what the stages recorded on its Linears (masks, scales) goes too
            m.__dict__.pop(STATE_ATTR, None)
        block.to("meta")
        release_freed_memory()
        self.live -= 1


class PackedBlocks(DiskBlocks):
    """Block i as compressed: the dense shards for what is not compressed (norms), and every target
    Linear replaced by the packed checkpoint's `PackedLinear` (dequantized once per block)."""

    def __init__(self, model: nn.Module, tensors: ShardedTensors, packed: str | Path):
        from .checkpoint.io import read_manifest

        super().__init__(model, tensors)
        self.path = Path(packed)
        self.manifest = read_manifest(self.path)
        self._swapped: dict[int, list[tuple[str, nn.Module]]] = {}

    def _packed_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.manifest["tensors"][k]["file"], []).append(k)
        out = {}
        for fname, names in by_file.items():
            with safe_open(str(self.path / fname), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in names})
        return out

    def load(self, i: int, block: nn.Module) -> None:
        from .checkpoint.io import _set_module
        from .checkpoint.layer import PackedLinear

        prefix = self.prefix(i)
        names = [n for group in self.adapter.linear_groups(block) for n, _ in group]
        swapped = []
        for name in names:
            meta = self.manifest["layers"].get(prefix + name)
            if meta is None:
                raise ConfigError(f"{self.path} has no layer {prefix + name}: it is not this run's checkpoint")
            t = self._packed_tensors(list(meta["tensors"].values()))
            packed = PackedLinear(meta, {role: t[key] for role, key in meta["tensors"].items()}, cache_weight=True)
            swapped.append((name, block.get_submodule(name)))
            _set_module(block, name, packed)
        self._swapped[i] = swapped
        super().load(i, block)  # the rest (norms) from the dense shards: _fill leaves the PackedLinears alone

    def free(self, i: int, block: nn.Module) -> None:
        from .checkpoint.io import _set_module

        for name, lin in self._swapped.pop(i, []):  # the meta Linears back in place
            _set_module(block, name, lin)
        super().free(i, block)


def streamed_model(folder: str | Path, config, dtype: torch.dtype) -> tuple[nn.Module, DiskBlocks]:
    """The model of `folder` on the meta device, with everything outside its blocks materialised
    from the checkpoint (embeddings, rotary, final norm, head; tied weights stay tied), and the
    source that materialises its blocks one at a time."""
    from transformers import AutoModelForCausalLM

    prefer_mmap()
    tensors = ShardedTensors(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from .models.moe import has_fused_experts

    if has_fused_experts(model):
        raise ConfigError(f"{config.model_type}: model.offload=disk cannot stream fused Mixture-of-Experts tensors yet "
                          "(its shards hold (E, 2I, H) expert tensors, compressed per expert); load it in memory "
                          "(model.offload=null)")
    tensors.bind(model)
    adapter = adapter_for(model)
    _fill_outside(model, tensors, adapter)
    return model.eval(), DiskBlocks(model, tensors, adapter)


@contextmanager
def _outside(model: nn.Module, adapter: Adapter):
    """`model` with its blocks detached (what runs outside them only), put back after."""
    blocks = adapter.block_list(model)
    parent, _, child = adapter.blocks.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, child, nn.ModuleList())
    try:
        yield model
    finally:
        setattr(owner, child, blocks)


def _fill_outside(model: nn.Module, tensors: ShardedTensors, adapter: Adapter) -> None:
    """Materialise everything outside the blocks from the shards; a tied head is tied after."""
    with _outside(model, adapter):
        head = _tied_head_key(model)
        _fill(model, "", tensors, model._init_weights, skip=(head,) if head else ())
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            out.weight = inp.weight


def reread_outside(model: nn.Module, source: DiskBlocks) -> None:
    """Read what lies outside the blocks (embeddings, final norm, head) from the shards again. The
    shards are memory-mapped, and what touched every page of them (the packed checkpoint's writer
    reads the whole embedding and head) left those pages counted in the process's RSS; fresh
    mappings start with none resident, so the evaluation afterwards pages in only the embedding rows
    of its tokens (and the head it reads whole). Same values: the same bytes are read."""
    with _outside(model, source.adapter):
        model.to("meta")  # as DiskBlocks.free returns a block; computed buffers (rotary) are computed again
    _fill_outside(model, source.tensors, source.adapter)
    release_freed_memory()


def _tied_head_key(model: nn.Module) -> str | None:
    """The head's weight key when it is tied to the input embeddings (not stored: tied after loading)."""
    out = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or out is None:
        return None
    return next(n for n, m in model.named_modules() if m is out) + ".weight"


class StreamedModel:
    """What an evaluator calls for a streamed model: `hidden(ids)` runs (W, T) token windows through
    every block, one block materialised at a time (the engine's capture and propagation), and
    `logits(h)` applies what follows the blocks (final norm, head) to one window's hidden states."""

    def __init__(self, model: nn.Module, source: DiskBlocks, engine):
        self.model, self.source, self.engine = model, source, engine
        self.adapter = adapter_for(model)
        self.config = model.config

    def hidden(self, ids: torch.Tensor, progress: bool = False) -> torch.Tensor:
        return self.engine.stream_hidden(self.model, ids, self.source, progress=progress)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) last-block outputs -> (B, T, V) logits."""
        for m in self.adapter.output_modules(self.model):
            h = m(h)
        return h

    def eval(self):  # evaluators call model.eval() / model.to(device): the engine places the blocks
        return self

    def to(self, *_args, **_kwargs):
        return self


class BlockSink:
    """The engine's sink for a streamed run: each final block's per-layer rows (metrics), then its
    packed tensors into the checkpoint writer, before the source frees it."""

    def __init__(self, writer, adapter: Adapter):
        from .metrics import layer_summary

        self.writer, self.adapter, self._summary = writer, adapter, layer_summary
        self.rows: list[dict] = []
        self.counts: list[tuple[int, ...]] = []

    def __call__(self, i: int, block: nn.Module) -> None:
        bits = self.writer.add_block(i, block) if self.writer is not None else {}  # packed once, counted from it
        for group in self.adapter.linear_groups(block):
            for name, lin in group:
                row, c = self._summary(f"{self.adapter.blocks}.{i}.{name}", lin, bits.get(name))
                self.rows.append(row)
                self.counts.append(c)
