"""The packed checkpoint: safetensors shards + manifest.json, and the loader that rebuilds a model.

    <dir>/manifest.json            format, version, model config, per-layer layout, tensor index,
                                   per-file sha256 and size, avg_bits of the compressed Linears
    <dir>/model.safetensors        or model-00001-of-0000N.safetensors when sharded
    <dir>/tokenizer*               when a tokenizer was given

Only safetensors and JSON are read: nothing is unpickled. The manifest is written last, so an
interrupted save has none and is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import adapter_for
from ..models.moe import has_linear_routers
from .layer import PackedLinear, pack_linear, storage_bits
from .shard import ShardFile

log = logging.getLogger(__name__)

FORMAT, VERSION = "compresslab-packed", 1
MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, truncated, corrupted or inconsistent with its manifest."""


def parse_size(size: int | str | None) -> int | None:
    """Bytes of a shard-size setting: an int, or '2GB' / '500MB' / '1GiB' ...; None: no limit."""
    if size is None:
        return None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = str(size).strip().upper()
    unit = next((u for u in sorted(units, key=len, reverse=True) if s.endswith(u)), "B")
    try:
        nbytes = int(float(s[: len(s) - len(unit)] if s.endswith(unit) else s) * units[unit])
    except ValueError:
        nbytes = 0
    if nbytes <= 0:
        raise ConfigError(f"save.max_shard_size={size!r} is not a positive size; use e.g. 2GB, 500MB or null")
    return nbytes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _other_tensors(module: nn.Module, prefix: str, skip: set[str], seen: dict | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], list]:
    """Every parameter/buffer of `module` outside the packed Linears and the `skip`ped submodules (fp32
    stored as fp16), keys prefixed with `prefix`; aliases of tensors that share storage (tied
    embeddings; `seen` carries the storages across calls); and the non-persistent buffers (rotary
    inv_freq, kept exact) that state_dict leaves out."""
    out, aliases = {}, {}
    seen = {} if seen is None else seen
    state = module.state_dict()
    buffers = []

    def skipped(key):
        return any(key == s or key.startswith(s + ".") for s in skip)

    for key, b in module.named_buffers():
        if key not in state and b is not None and not skipped(key.rsplit(".", 1)[0]):
            out[prefix + key] = b.detach().cpu().contiguous()
            buffers.append(prefix + key)
    for key, v in state.items():
        if skipped(key.rsplit(".", 1)[0]) or skipped(key):
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            aliases[prefix + key] = seen[ptr]
            continue
        seen[ptr] = prefix + key
        out[prefix + key] = _Half(v.detach())  # converted one at a time as it is written
    return out, aliases, buffers


class _Half:
    """A parameter stored as fp16 (when fp32), converted only when the writer takes it, so saving
    never holds a second copy of more than one tensor (the embeddings and head of a streamed model)."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.dtype = torch.float16 if t.dtype == torch.float32 else t.dtype
        self.shape = t.shape

    def numel(self) -> int:
        return self.t.numel()

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def tensor(self) -> torch.Tensor:
        return self.t.to("cpu", self.dtype).contiguous()


class CheckpointWriter:
    """Writes a packed checkpoint block by block, so a streamed run never holds the whole model:
    `add_block(i, block)` packs a block's Linears and its other tensors as soon as the block is
    final, `finish(model)` adds what lives outside the blocks (embeddings, final norm, head) and
    writes the manifest last. Shards fill in that order up to `max_shard_size`; they are named
    model-XXXXX-of-XXXXX.safetensors once their number is known (model.safetensors when one). Each
    tensor goes to disk as it comes (shard.ShardFile): the writer holds none of them, whatever the
    shard size. `save_compressed` is this writer run over an in-memory model, so both give the same files."""

    def __init__(self, path: str | Path, adapter, max_shard_size: int | str | None = "2GB"):
        self.path, self.adapter = Path(path), adapter
        self.limit = parse_size(max_shard_size)
        self.path.mkdir(parents=True, exist_ok=True)
        stale = [*self.path.glob("model*.safetensors"), *self.path.glob("model-part-*.safetensors.tmp"),
                 *self.path.glob(".model-part-*.spool*")]
        for old in stale + [self.path / MANIFEST]:
            old.unlink(missing_ok=True)
        self.layers: dict[str, dict] = {}
        self.index: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.buffers: list[str] = []
        self.bits = self.params = 0
        self._shard: ShardFile | None = None  # the shard being written (tensors go to disk as they come)
        self._written: list[Path] = []  # shard files so far, under temporary names

    def _add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if self.limit and self._shard is not None and self._shard.nbytes and \
                    self._shard.nbytes + nbytes > self.limit:
                self._flush()
            if self._shard is None:
                self._shard = ShardFile(self.path / f"model-part-{len(self._written) + 1:05d}.safetensors.tmp")
            self._shard.add(key, v.tensor() if isinstance(v, _Half) else v)
            self.index[key] = {"file": self._shard.path.name, "dtype": str(v.dtype).removeprefix("torch."),
                               "shape": list(v.shape)}

    def _flush(self) -> None:
        if self._shard is None:
            self._shard = ShardFile(self.path / f"model-part-{len(self._written) + 1:05d}.safetensors.tmp")
        self._shard.close()
        self._written.append(self._shard.path)
        self._shard = None

    def add_block(self, i: int, block: nn.Module) -> dict[str, int]:
        """Pack block `i` (final: compressed and recovered) into the checkpoint. Returns each Linear's
        storage bits, by its name in the block."""
        prefix = f"{self.adapter.blocks}.{i}."
        names, bits = [], {}
        for group in self.adapter.linear_groups(block):
            for name, lin in group:
                meta, t = pack_linear(lin)
                meta["tensors"] = {k: f"{prefix}{name}.{k}" for k in t}
                self.layers[prefix + name] = meta
                self._add({f"{prefix}{name}.{k}": v.detach().cpu().contiguous() for k, v in t.items()})
                bits[name] = storage_bits(t)
                self.bits += bits[name]
                self.params += lin.weight.numel()
                names.append(name)
        other, aliases, buffers = _other_tensors(block, prefix, set(names))
        self._add(other)
        self.aliases.update(aliases)
        self.buffers += buffers
        return bits

    def finish(self, model: nn.Module, tokenizer=None, extra: dict | None = None) -> dict:
        """Add the tensors outside the blocks, name the shards, write the manifest (last). Returns it."""
        other, aliases, buffers = _other_tensors(model, "", {self.adapter.blocks})
        self._add(other)
        self.aliases.update(aliases)
        self.buffers += buffers
        if self._shard is not None or not self._written:
            self._flush()
        n = len(self._written)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        rename = {}
        files = {}
        for tmp, fname in zip(self._written, names):
            os.replace(tmp, self.path / fname)
            rename[tmp.name] = fname
            files[fname] = {"bytes": (self.path / fname).stat().st_size, "sha256": _sha256(self.path / fname)}
        index = {k: {**v, "file": rename[v["file"]]} for k, v in self.index.items()}
        manifest = {
            "format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "family": self.adapter.family,
            "layers": self.layers, "aliases": self.aliases, "buffers": self.buffers, "tensors": index, "files": files,
            "compressed": {"avg_bits": self.bits / max(self.params, 1), "bytes": self.bits / 8, "params": self.params},
            "moe_router": "compress" if has_linear_routers(model) else "dense",  # models/moe.py
            **(extra or {}),
        }
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.replace(tmp, self.path / MANIFEST)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.path))
        log.info("saved %s: %d files, %.1f MB, compressed Linears at %.3f bits/weight", self.path, len(files),
                 sum(f["bytes"] for f in files.values()) / 1e6, manifest["compressed"]["avg_bits"])
        return manifest


def save_compressed(model: nn.Module, path: str | Path, tokenizer=None, max_shard_size: int | str | None = "2GB",
                    extra: dict | None = None) -> dict:
    """Write `model` (compressed in place by compresslab) as a packed checkpoint. Returns the manifest."""
    adapter = adapter_for(model)
    writer = CheckpointWriter(path, adapter, max_shard_size)
    for i, block in enumerate(adapter.block_list(model)):
        writer.add_block(i, block)
    return writer.finish(model, tokenizer, extra)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder a compresslab save wrote")
    if not f.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: not a compresslab packed checkpoint, or its save was "
                              "interrupted (the manifest is written last); save it again")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupted, save it again") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{f} has format {manifest.get('format')!r}, not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{f} is format version {manifest.get('version')}; this compresslab reads "
                              f"version {VERSION}")
    for key in ("config", "layers", "tensors", "files"):
        if key not in manifest:
            raise CheckpointError(f"{f} has no {key!r} entry; the manifest is incomplete")
    return manifest


def _read_tensors(path: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    for fname, info in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST})")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, the manifest says {info['bytes']}: "
                                  "the file is truncated or was replaced")
        if verify and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in {MANIFEST}: the file is corrupted")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    out[key] = sf.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from e
    for key, info in manifest["tensors"].items():
        if key not in out:
            raise CheckpointError(f"tensor {key} (in {MANIFEST}) is not in {info['file']}")
        t = out[key]
        if list(t.shape) != info["shape"] or str(t.dtype).removeprefix("torch.") != info["dtype"]:
            raise CheckpointError(f"tensor {key} is {t.dtype} {list(t.shape)} but the manifest says "
                                  f"{info['dtype']} {info['shape']}")
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the meta parameters/buffers outside the PackedLinears (which already hold their data)."""
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    for mname, mod in model.named_modules():
        if any(mname == p or mname.startswith(p + ".") for p in packed):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.empty_like(b, device=device)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = True, cache_weights: bool = False, load_tokenizer: bool = True):
    """Rebuild a transformers model from a packed checkpoint: (model, tokenizer or None).

    Compressed Linears become `PackedLinear`s that dequantize their weight on the fly (on the CPU;
    the Triton kernels take over on a GPU when available). `verify` checks every file's sha256.
    `cache_weights` keeps each dequantized weight after its first use (faster, more memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    tensors = _read_tensors(path, manifest, verify)
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    cfg = dict(manifest["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from ..models import as_linears
    from ..models.moe import linear_routers

    as_linears(model)  # the layers as they were saved: Linears, one MLP per expert
    if manifest.get("moe_router") == "compress":
        linear_routers(model)  # and the routers' projections, when they were compressed
    for name, meta in manifest["layers"].items():
        try:
            t = {role: tensors.pop(key) for role, key in meta["tensors"].items()}
        except KeyError as e:
            raise CheckpointError(f"layer {name}: tensor {e} is listed in its layout but not stored") from e
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"layer {name} of the manifest does not exist in {type(model).__name__}") from e
        _set_module(model, name, PackedLinear(meta, t, cache_weight=cache_weights))
    _materialize(model, device)
    for key in manifest.get("buffers", []):  # non-persistent buffers, set as saved
        owner, _, bname = key.rpartition(".")
        model.get_submodule(owner)._buffers[bname] = tensors.pop(key).to(device)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"tensors {unexpected[:5]} of the checkpoint have no place in the model")
    aliases = manifest.get("aliases", {})
    for alias, target in aliases.items():  # tied weights: point the alias at the stored tensor
        owner, _, pname = alias.rpartition(".")
        towner, _, tname = target.rpartition(".")
        setattr(model.get_submodule(owner), pname, getattr(model.get_submodule(towner), tname))
    persistent_missing = [k for k in missing if k not in aliases and ".packed." not in k]
    if persistent_missing:
        raise CheckpointError(f"the checkpoint lacks {persistent_missing[:5]}; it does not match its config")
    model.to(device).eval()
    tok = None
    if load_tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok
