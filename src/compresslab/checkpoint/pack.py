"""Bit packing for the checkpoint format: pure functions on tensors.

Codes are written as one little-endian bit stream into int32 words: value i occupies bits
[i·b, (i+1)·b) of the stream. For b = 4 and rows whose length is a multiple of 8 this is the usual
"8 nibbles per int32 along the input dimension" layout GPU kernels read; b = 3 packs 32 values in
3 words. N:M sparsity (2:4) is stored as the n kept values of each group of m plus a ⌈log2 m⌉-bit
position each.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # values per step (a multiple of 32, so chunks start on word boundaries)


def packed_words(n: int, bits: int) -> int:
    """int32 words that hold `n` values of `bits` bits."""
    return math.ceil(n * bits / 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) integers in [0, 2^bits) -> (packed_words(n, bits),) int32."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit values")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values outside [0, 2^{bits}) cannot be packed in {bits} bits")
    out = []
    if 32 % bits == 0:  # fast path: whole values per word
        per = 32 // bits
        pad = (-v.numel()) % per
        vp = torch.cat([v, v.new_zeros(pad)]) if pad else v
        return _to_int32((vp.reshape(-1, per) << (bits * torch.arange(per, device=v.device))).sum(1))
    shifts_b = torch.arange(bits, device=v.device)
    shifts_32 = torch.arange(32, device=v.device)
    for s in range(0, max(v.numel(), 1), CHUNK):
        chunk = v[s : s + CHUNK]
        stream = ((chunk[:, None] >> shifts_b) & 1).reshape(-1)  # (k·bits,) bits, LSB first
        pad = (-stream.numel()) % 32
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.reshape(-1, 32) << shifts_32).sum(1))
    return _to_int32(torch.cat(out)[: packed_words(v.numel(), bits)])


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (n,) int64."""
    if words.numel() < packed_words(n, bits):
        raise ValueError(f"{words.numel()} words cannot hold {n} values of {bits} bits")
    w = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:  # fast path
        per = 32 // bits
        vals = (w[: packed_words(n, bits), None] >> (bits * torch.arange(per, device=w.device))) & (2**bits - 1)
        return vals.reshape(-1)[:n]
    shifts_32 = torch.arange(32, device=w.device)
    weights = 1 << torch.arange(bits, device=w.device)
    out = []
    step_words = CHUNK * bits // 32  # CHUNK values per step
    for s in range(0, max(packed_words(n, bits), 1), step_words):
        stream = ((w[s : s + step_words, None] >> shifts_32) & 1).reshape(-1)
        k = stream.numel() // bits
        out.append((stream[: k * bits].reshape(k, bits) * weights).sum(1))
    return torch.cat(out)[:n]


def compact_nm(keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An N:M keep-mask (out, in) -> (column index (out, in·n/m) of the stored entries, their
    position inside their group of m (out, in·n/m)).

    Groups with fewer than n kept entries (a weight that is exactly 0 anyway) are filled with the
    first dropped positions, so every group stores exactly n values."""
    out, d = keep.shape
    if d % m:
        raise ValueError(f"{n}:{m} needs an input width divisible by {m}, got {d}")
    g = keep.reshape(out, d // m, m)
    if int(g.sum(-1).max()) > n:
        raise ValueError(f"the weight is not {n}:{m} sparse (a group of {m} holds more than {n} non-zeros)")
    pos = torch.argsort((~g).to(torch.int8), dim=-1, stable=True)[..., :n].sort(-1).values  # (out, d/m, n)
    base = torch.arange(0, d, m, device=keep.device)[None, :, None]
    return (base + pos).reshape(out, d * n // m), pos.reshape(out, d * n // m)


def nm_columns(positions: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Stored positions (out, in·n/m) -> their column index in the dense (out, in) matrix."""
    k = positions.shape[1]
    base = torch.arange(k // n, device=positions.device).repeat_interleave(n)[None, :] * m
    return base + positions.to(torch.int64)


def expand_nm(values: torch.Tensor, positions: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """(out, in·n/m) stored values + positions -> the dense (out, in) matrix with zeros elsewhere."""
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter_(1, nm_columns(positions, n, m), values)
