"""One safetensors file written tensor by tensor, holding none of them in memory.

safetensors' own `save_file` needs every tensor of a file at once; a streamed run (stream.py) must
not hold a shard's worth of packed tensors. The format is simple (https://github.com/huggingface/safetensors,
"Format"): an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus "__metadata__"), padded with spaces to a multiple of 8, then the tensors' bytes back to back.
Bytes are spooled to one scratch file per element size as tensors arrive; `close()` writes the
header and copies the spools largest element size first, so every tensor stays aligned to its
element size (as safetensors orders them). The result is read by `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class ShardFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.nbytes = 0
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}  # element size -> entries
        self._spools: dict[int, object] = {}

    def _spool(self, size: int):
        if size not in self._spools:
            self._spools[size] = open(self.path.with_name(f".{self.path.name}.spool{size}"), "w+b")
        return self._spools[size]

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        size, n = t.element_size(), t.numel() * t.element_size()
        if n:  # the tensor's own bytes, no copy (a uint8 view of its memory)
            t.reshape(-1).view(torch.uint8).numpy().tofile(self._spool(size))
        self._entries.setdefault(size, []).append((name, DTYPES[t.dtype], list(t.shape), n))
        self.nbytes += n

    def close(self) -> None:
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for size in sorted(self._entries, reverse=True):
            for name, dtype, shape, n in self._entries[size]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
                at += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for size in sorted(self._spools, reverse=True):
                spool = self._spools[size]
                spool.seek(0)
                shutil.copyfileobj(spool, out, 1 << 24)
        self.discard()

    def discard(self) -> None:
        for size, spool in self._spools.items():
            spool.close()
            Path(spool.name).unlink(missing_ok=True)
        self._spools = {}
