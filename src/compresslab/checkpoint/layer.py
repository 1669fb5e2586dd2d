"""One compressed Linear <-> its packed tensors, and the module that computes from them.

`pack_linear(lin)` -> (meta, tensors): what the checkpoint stores for one Linear. `PackedLinear`
rebuilds the layer from exactly those tensors and, on the CPU, dequantizes its weight on the fly.
Every tensor except `bias` counts toward avg_bits, so `metrics.layer_storage_bits` is their size.

Per-layer tensors (key suffixes):
    qweight   int32  bit stream of the codes (only the kept entries when pruned); with a SliM-LLM
                     bit map, one stream per input group at that group's width
    scales    fp16   (out, groups)
    qzeros    int32  bit stream of the zero points (asymmetric grids only), same widths as codes
    bit_map   uint8  (groups,) bits per input group (mixed precision)
    weight    fp16   values when not quantized (again only the kept ones when pruned)
    nm_pos    int32  N:M: bit stream of the kept entries' positions inside their group (⌈log2 m⌉ bits)
    mask      int32  unstructured sparsity: the pruner's keep-mask, 1 bit per weight (row-major);
                     the kept entries follow in row-major order
    The positions and the bitmap are the PRUNER's mask, so a kept weight that quantization rounded
    to 0 stays kept (recovery after loading trains it; `PackedLinear.keep_mask()`).
    lut       fp16   (out, 2^bits) per-row tables of a non-uniform quantizer (SqueezeLLM): W = lut[row, code];
                     its codes are `qweight` at `bits`, like a uniform grid's
    outlier_ptr / outlier_col / outlier_val   weights kept exactly (dense-and-sparse), CSR: int32 row
                     pointers (out + 1), int16 columns (int32 past 32767 inputs), fp16 values; they
                     replace whatever the codes give at their positions
    input_scale fp16 (in,) explicit per-input-channel scale (AWQ): W = dequant(codes) / s
    lora_A / lora_B  low-rank adapters (or the factors, when they replace the weight): fp16, or
                     `<name>.codes` (4-bit, code + 8) with `<name>.scales` per tile of 128 inputs;
                     a 2:4-pruned A stores its kept half plus `lora_A.nm_pos`
    bias      fp16
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lowrank.base import ADAPTER_TILE, absmax_codes
from ..pruner.masks import parse_pattern
from ..quantizer.format import QuantizedWeight
from ..stages import layer_state
from ..quantizer.grid import symmetric_zero
from .pack import compact_nm, expand_nm, nm_columns, pack_bits, packed_words, unpack_bits



def _nm(state, d: int):
    nm = parse_pattern(state.pattern) if state is not None and state.pattern else None
    return nm if nm is not None and d % nm[1] == 0 else None


def _group_streams(M: torch.Tensor, widths: list[int], cols_per_group: int) -> torch.Tensor:
    """Pack the column blocks of M (rows, groups·cols_per_group), block j at widths[j] bits."""
    parts = [pack_bits(M[:, j * cols_per_group : (j + 1) * cols_per_group].reshape(-1), b)
             for j, b in enumerate(widths)]
    return torch.cat(parts)


def _unpack_group_streams(words: torch.Tensor, widths: list[int], rows: int, cols_per_group: int) -> torch.Tensor:
    out, at = [], 0
    for b in widths:
        n = rows * cols_per_group
        k = packed_words(n, b)
        out.append(unpack_bits(words[at : at + k], b, n).reshape(rows, cols_per_group))
        at += k
    if at != words.numel():
        raise ValueError(f"packed stream has {words.numel()} words, the layout needs {at}")
    return torch.cat(out, dim=1)


def _pack_adapter(name: str, T: torch.Tensor, bits: int | None, pruned: bool) -> dict:
    """A (r, in) or B (out, r), fp16 or 4-bit AbsMax per tile of 128 inputs; A optionally 2:4."""
    T = T.detach().float()
    out: dict[str, torch.Tensor] = {}
    if pruned:
        idx, pos = compact_nm(T != 0, 2, 4)
        out[f"{name}.nm_pos"] = pack_bits(pos.reshape(-1), 2)
        T = T.gather(1, idx)  # (rows, in/2): a tile of 128 inputs is 64 stored values
    tile = ADAPTER_TILE // 2 if pruned else ADAPTER_TILE
    if bits is None:
        out[name] = T.half()
        return out
    codes, scale = absmax_codes(T, bits, tile)
    out[f"{name}.codes"] = pack_bits((codes + 2 ** (bits - 1)).to(torch.int64).reshape(-1), bits)
    out[f"{name}.scales"] = scale.half()
    return out


def _unpack_adapter(name: str, t: dict, shape: tuple[int, int], bits: int | None, pruned: bool) -> torch.Tensor:
    rows, cols = shape
    kept = cols // 2 if pruned else cols
    if bits is None:
        T = t[name].float()
    else:
        qmax = 2 ** (bits - 1) - 1
        codes = unpack_bits(t[f"{name}.codes"], bits, rows * kept).reshape(rows, kept) - (qmax + 1)
        scale = t[f"{name}.scales"].float()
        g = min(ADAPTER_TILE // 2 if pruned else ADAPTER_TILE, kept)
        T = codes.float() * scale.repeat_interleave(g, dim=1)[:, :kept]
    if pruned:
        pos = unpack_bits(t[f"{name}.nm_pos"], 2, rows * kept).reshape(rows, kept)
        T = expand_nm(T, pos, 2, 4, cols)
    return T


@torch.no_grad()
def pack_linear(lin: nn.Linear) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) for one compressed (or plain) Linear."""
    state = layer_state(lin)
    out, d = lin.weight.shape
    meta: dict = {"shape": [out, d], "bias": lin.bias is not None}
    t: dict[str, torch.Tensor] = {}
    adapter = state.adapter if state is not None else None
    if adapter is not None:
        meta["adapter"] = {"rank": adapter.rank, "bits": adapter.quantized_bits, "pruned": adapter.pruned,
                           "replaces": adapter.replaces}
        if adapter.replaces:
            B, A = state.factors
        else:
            B, A = lin.lora_B, lin.lora_A
        t.update(_pack_adapter("lora_A", A, adapter.quantized_bits, adapter.pruned))
        t.update(_pack_adapter("lora_B", B, adapter.quantized_bits, False))
    if adapter is None or not adapter.replaces:
        W = lin.weight.detach().float()
        nm = _nm(state, d)
        mask = state.keep_mask(W.device) if state is not None else None
        idx = bitmap = None
        if nm is not None:
            idx, pos = compact_nm(mask, *nm)  # a pattern always comes with its mask
            meta["nm"] = list(nm)
            t["nm_pos"] = pack_bits(pos.reshape(-1), math.ceil(math.log2(nm[1])))
        elif mask is not None:  # unstructured: a bitmap, then only the kept entries
            bitmap = mask
            meta["sparse"] = "bitmap"
            t["mask"] = pack_bits(mask.reshape(-1).to(torch.int64), 1)

        def kept(M):  # the stored entries of an (out, d) matrix: all, the N:M kept ones, or the bitmap's
            return M if idx is None and bitmap is None else M.gather(1, idx) if idx is not None else M[bitmap]

        qw: QuantizedWeight | None = state.quant if state is not None else None
        if state is not None and state.outliers is not None:
            t.update(_pack_outliers(W, state.outliers.to(W.device)))
        if state is not None and state.lut is not None:
            lw = state.lut
            meta["lut"] = {"bits": lw.bits}
            t["lut"] = lw.lut.half()
            t["qweight"] = pack_bits(kept(lw.encode(W).codes.to(torch.int64)).reshape(-1), lw.bits)
        if state is not None and state.input_scale is not None:
            s = state.input_scale.float()
            t["input_scale"] = state.input_scale.half()
            W = W * s[None, :]

        if qw is None and "lut" not in t:
            t["weight"] = kept(W).half()
        elif qw is not None:
            g = qw.group_size
            meta["quant"] = {"bits": qw.bits, "group_size": g, "grid": qw.grid, "symmetric": qw.symmetric,
                             "mixed": qw.bit_map is not None}
            codes = qw.encode(W).codes.to(torch.int64)
            zeros = qw.zeros.round().to(torch.int64)
            if qw.stat is not None:  # SpQR: the statistics as codes + a (step, low) per chunk of rows
                if qw.bit_map is not None:
                    raise ValueError("quantized statistics with a mixed-precision bit map are not a stored layout")
                meta["quant"]["stat"] = {"bits": qw.stat["bits"], "group": qw.stat["group"]}
                for k, key in (("scales", "scales"), ("zeros", "qzeros")):
                    if k in qw.stat:
                        c, step, low = qw.stat[k]
                        t[f"{key}.codes"] = pack_bits(c.to(torch.int64).reshape(-1), qw.stat["bits"])
                        t[f"{key}.step"], t[f"{key}.low"] = step.half(), low.half()
            else:
                t["scales"] = qw.scales.half()
            if qw.bit_map is None:
                t["qweight"] = pack_bits(kept(codes).reshape(-1), qw.bits)
                if not qw.symmetric and qw.stat is None:  # quantized zeros were stored with the statistics
                    t["qzeros"] = pack_bits(zeros.reshape(-1), qw.bits)
            else:
                widths = [int(b) for b in qw.bit_map]
                t["bit_map"] = qw.bit_map.to(torch.uint8)
                if bitmap is not None:  # one stream per group: the group's kept codes, row-major
                    t["qweight"] = torch.cat([pack_bits(codes[:, j * g:(j + 1) * g][bitmap[:, j * g:(j + 1) * g]], b)
                                              for j, b in enumerate(widths)])
                else:
                    codes = kept(codes)
                    kept_per_group = g * codes.shape[1] // d
                    if kept_per_group * d != g * codes.shape[1]:
                        raise ValueError(f"group size {g} does not split the stored columns of an N:M weight")
                    t["qweight"] = _group_streams(codes, widths, kept_per_group)
                if not qw.symmetric:
                    t["qzeros"] = _group_streams(zeros, widths, 1)
    if state is not None and state.online is not None:
        meta["online"] = state.online.spec()
    if state is not None and state.act is not None:
        a = state.act
        meta["act"] = {"bits": a.bits, "granularity": a.granularity, "group_size": a.group_size}
    if lin.bias is not None:
        t["bias"] = lin.bias.detach().half()
    return meta, t


def _pack_outliers(W: torch.Tensor, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR of the weights at the sorted flat indices `flat` of W (out, d)."""
    out, d = W.shape
    rows, cols = flat // d, flat % d
    ptr = torch.zeros(out + 1, dtype=torch.int64, device=W.device)
    ptr[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    return {"outlier_ptr": ptr.to(torch.int32), "outlier_col": cols.to(torch.int16 if d <= 32767 else torch.int32),
            "outlier_val": W.reshape(-1)[flat].half()}


def stored_outliers(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows (nnz,) int64, cols (nnz,) int64, values (nnz,) float32) of the stored outliers, or None."""
    if "outlier_ptr" not in t:
        return None
    ptr = t["outlier_ptr"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff())
    return rows, t["outlier_col"].to(torch.int64), t["outlier_val"].float()


def storage_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits of the packed tensors that count toward avg_bits (all but the bias)."""
    return sum(v.numel() * v.element_size() * 8 for k, v in tensors.items() if k != "bias")


def stored_mask(meta: dict, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pruner's keep-mask (out, in) bool, from the N:M positions or the bitmap; None if unpruned."""
    out, d = meta["shape"]
    nm = meta.get("nm")
    if nm:
        kept = d * nm[0] // nm[1]
        pos = unpack_bits(t["nm_pos"], math.ceil(math.log2(nm[1])), out * kept).reshape(out, kept)
        return torch.zeros(out, d, dtype=torch.bool, device=pos.device).scatter_(1, nm_columns(pos, *nm), True)
    if meta.get("sparse") == "bitmap":
        return unpack_bits(t["mask"], 1, out * d).reshape(out, d).bool()
    return None


def _grid_of(q: dict) -> str:
    return q.get("grid") or ("sym" if q["symmetric"] else "asym")  # checkpoints before `grid` existed


def dense_codes(meta: dict, t: dict[str, torch.Tensor], mask: torch.Tensor | None, q: dict | None = None) -> torch.Tensor:
    """The (out, in) int64 codes, with the pruned entries' codes set to 0 (they are masked anyway);
    `q`: the layout ({bits, mixed, group_size}) when it is not meta["quant"] (a table's codes)."""
    out, d = meta["shape"]
    q = q or meta["quant"]
    nm, g = meta.get("nm"), q["group_size"]
    widths = [int(b) for b in t["bit_map"]] if q["mixed"] else None
    if nm:
        kept = d * nm[0] // nm[1]
        pos = unpack_bits(t["nm_pos"], math.ceil(math.log2(nm[1])), out * kept).reshape(out, kept)
        stored = (_unpack_group_streams(t["qweight"], widths, out, g * kept // d) if widths else
                  unpack_bits(t["qweight"], q["bits"], out * kept).reshape(out, kept))
        return expand_nm(stored, pos, *nm, d)
    if mask is None:
        return (_unpack_group_streams(t["qweight"], widths, out, g) if widths else
                unpack_bits(t["qweight"], q["bits"], out * d).reshape(out, d))
    codes = torch.zeros(out, d, dtype=torch.int64, device=mask.device)
    if widths is None:
        codes[mask] = unpack_bits(t["qweight"], q["bits"], int(mask.sum()))
        return codes
    at = 0
    for j, b in enumerate(widths):  # one stream per group: its kept codes, row-major
        m = mask[:, j * g:(j + 1) * g]
        n = int(m.sum())
        block = torch.zeros(out, g, dtype=torch.int64, device=mask.device)
        block[m] = unpack_bits(t["qweight"][at:], b, n)
        codes[:, j * g:(j + 1) * g] = block
        at += packed_words(n, b)
    if at != t["qweight"].numel():
        raise ValueError(f"packed stream has {t['qweight'].numel()} words, the layout needs {at}")
    return codes


def _stat_values(t: dict[str, torch.Tensor], key: str, bits: int, group: int, rows: int) -> torch.Tensor:
    """(rows, C) values of quantized statistics: low + step·code per chunk of `group` rows (grid.stat_values)."""
    step, low = t[f"{key}.step"].float(), t[f"{key}.low"].float()  # (n, C)
    n, C = step.shape
    codes = unpack_bits(t[f"{key}.codes"], bits, rows * C).reshape(rows, C)
    codes = torch.nn.functional.pad(codes, (0, 0, 0, n * group - rows)).reshape(n, group, C).float()
    return (low[:, None, :] + step[:, None, :] * codes).reshape(n * group, C)[:rows]


def stored_scales_zeros(meta: dict, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros), each (R, C) float32, as the layer computes with them."""
    q = meta["quant"]
    st = q.get("stat")
    if st is None:
        return t["scales"].float(), dense_zeros(meta, t).float()
    out, d = meta["shape"]
    C = d // q["group_size"]
    scales = _stat_values(t, "scales", st["bits"], st["group"], out).clamp_min(2**-24)
    if _grid_of(q) == "asym":
        zeros = _stat_values(t, "qzeros", st["bits"], st["group"], out)
    else:
        zeros = torch.full((out, C), float(symmetric_zero(q["bits"], _grid_of(q))))
    return scales, zeros


def dense_zeros(meta: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, C) zero points: stored for asymmetric grids, the grid's constant otherwise."""
    q = meta["quant"]
    grid = _grid_of(q)
    shape = t["scales"].shape
    if q["mixed"]:
        widths = [int(b) for b in t["bit_map"]]
        if grid == "asym":
            return _unpack_group_streams(t["qzeros"], widths, shape[0], 1)
        return torch.tensor([symmetric_zero(b, grid) for b in widths])[None].expand(shape[0], -1)
    if grid == "asym":
        return unpack_bits(t["qzeros"], q["bits"], t["scales"].numel()).reshape(shape)
    return torch.full(shape, symmetric_zero(q["bits"], grid))


def dequantize_weight(meta: dict, t: dict[str, torch.Tensor], outliers: bool = True) -> torch.Tensor | None:
    """The (out, in) float32 weight (without adapters), or None when the factors replace it;
    `outliers=False`: what the codes alone give (the kernels' part)."""
    out, d = meta["shape"]
    if meta.get("adapter", {}).get("replaces"):
        return None
    mask = stored_mask(meta, t)
    q = meta.get("quant")
    if meta.get("lut"):
        codes = dense_codes(meta, t, mask, {"bits": meta["lut"]["bits"], "mixed": False, "group_size": d})
        W = t["lut"].float().to(codes.device).gather(1, codes)
        if mask is not None:
            W = W * mask
    elif q is None:
        vals = t["weight"].float()
        if mask is None:
            W = vals
        else:
            W = torch.zeros(out, d, device=vals.device)
            W[mask] = vals.reshape(-1)  # N:M and bitmap both store the kept entries row-major
    else:
        g = q["group_size"]
        scales, zeros = stored_scales_zeros(meta, t)
        scales = scales.expand(out, -1).repeat_interleave(g, dim=1)[:, :d]  # (1, C) when per tensor
        zeros = zeros.to(scales.device).expand(out, -1).repeat_interleave(g, dim=1)[:, :d]
        W = scales * (dense_codes(meta, t, mask).float() - zeros)
        if mask is not None:
            W = W * mask
    if "input_scale" in t:
        W = W / t["input_scale"].float()[None, :]
    sparse = stored_outliers(t) if outliers else None
    if sparse is not None:  # the weights kept exactly, over whatever the codes gave there
        rows, cols, vals = sparse
        W[rows.to(W.device), cols.to(W.device)] = vals.to(W.device)
    return W


class PackedLinear(nn.Module):
    """A Linear rebuilt from its packed tensors: y = W x (+ b) + B(A x), W dequantized on the fly.

    `cache_weight=True` keeps the dequantized weight after the first call (faster on the CPU,
    but then the layer holds a dense weight in memory)."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor], cache_weight: bool = False):
        super().__init__()
        self.meta = meta
        self.in_features, self.out_features = meta["shape"][1], meta["shape"][0]
        self.packed = nn.Module()  # the stored tensors as buffers, so .to(device) moves them
        self._keys = []
        for k, v in tensors.items():
            self.packed.register_buffer(k.replace(".", "__"), v)
            self._keys.append(k)
        self.cache_weight, self._w = cache_weight, None
        self._kops: tuple | None | bool = False  # kernel operands, built on first use (False: not yet)
        self._fix: tuple | None | bool = False  # the outliers' correction for the kernels (sparse_correction)
        self.online = None  # rotation R4: the input's online Hadamard, before anything else
        if meta.get("online"):
            from ..rotation.base import OnlineHadamard

            self.online = OnlineHadamard.from_spec(meta["online"])
        self.act = None
        if meta.get("act"):
            from ..quantizer.activations import ActQuant

            a = meta["act"]
            self.act = ActQuant(a["bits"], a["granularity"], a["group_size"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self.packed, k.replace(".", "__")) for k in self._keys}

    def keep_mask(self) -> torch.Tensor | None:
        """The pruner's keep-mask as stored (None when the layer was not pruned)."""
        return stored_mask(self.meta, self.tensors())

    def weight_and_adapters(self, need_weight: bool = True):
        t = self.tensors()
        W = None
        if need_weight:
            W = self._w if self._w is not None else dequantize_weight(self.meta, t)
        if self.cache_weight and W is not None:
            self._w = W
        ad = self.meta.get("adapter")
        A = B = None
        if ad is not None:
            r = ad["rank"]
            A = _unpack_adapter("lora_A", t, (r, self.in_features), ad["bits"], ad["pruned"])
            B = _unpack_adapter("lora_B", t, (self.out_features, r), ad["bits"], False)
        return W, A, B

    def kernel_operands(self):
        """Operands of the int4 kernels (compresslab.kernels), or None when this layer's layout has
        none (other bit widths, bit maps, AWQ input scales, widths the row-aligned streams need)."""
        if self._kops is not False:
            return self._kops
        self._kops = None
        q, nm, t = self.meta.get("quant"), self.meta.get("nm"), self.tensors()
        N, K = self.out_features, self.in_features
        lut = self.meta.get("lut")
        if lut is not None:  # 4-bit codes into per-row tables, dense (no mask) rows of whole words
            if lut["bits"] == 4 and nm is None and "mask" not in t and "input_scale" not in t and K % 8 == 0:
                self._kops = ("lut4", t["qweight"].view(N, K // 8), t["lut"])
            return self._kops
        ok = (q is not None and q["bits"] == 4 and not q["mixed"] and "input_scale" not in t
              and (nm is None and K % 8 == 0 or nm == [2, 4] and K % 32 == 0)
              and not (q.get("stat") and (nm or "mask" in t)))  # quantized zeros: a pruned code is not 0
        if ok:
            grid = _grid_of(q)
            scales, zeros = stored_scales_zeros(self.meta, t)
            if not q.get("stat"):
                scales = t["scales"]
            zeros = zeros.to(scales.device) if grid != "sym" else None  # sym: the kernels' constant zero 8
            if nm is None:
                qweight = t["qweight"]
                mask = stored_mask(self.meta, t)
                if mask is not None:  # bitmap-stored: the kernel reads dense codes, a pruned one at the zero point
                    z = dense_zeros(self.meta, t).to(mask.device).expand(N, -1)
                    z = z.repeat_interleave(q["group_size"], dim=1)[:, :K]
                    codes = torch.where(mask, dense_codes(self.meta, t, mask), z.to(torch.int64))
                    qweight = pack_bits(codes.reshape(-1), 4)
                self._kops = ("w4a16", qweight.view(N, K // 8), scales, zeros, q["group_size"])
            else:
                self._kops = ("sparse24", t["qweight"].view(N, K // 16), t["nm_pos"].view(N, K // 32), scales,
                              zeros, q["group_size"])
        return self._kops

    def sparse_correction(self):
        """(rows, cols, value − what the codes give there) of the stored outliers, for the kernels (which
        read the codes only); None without outliers. Built once."""
        if self._fix is False:
            t = self.tensors()
            sparse = stored_outliers(t)
            if sparse is None:
                self._fix = None
            else:
                rows, cols, vals = sparse
                base = dequantize_weight(self.meta, t, outliers=False)[rows, cols]
                self._fix = (rows, cols, vals - base)
        return self._fix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online is not None:
            x = self.online(self, (x,))[0]
        if self.act is not None:
            x = self.act(self, (x,))[0]
        ops = self.kernel_operands() if x.is_cuda else None
        if ops is not None:  # fused int4 kernels on the GPU (Triton), low-rank path in the epilogue
            from .. import kernels

            _, A, B = self.weight_and_adapters(need_weight=False)
            x2 = x.reshape(-1, self.in_features)
            if ops[0] == "w4a16":
                y = kernels.w4a16_matmul(x2, *ops[1:], A=A, B=B)
            elif ops[0] == "lut4":
                y = kernels.lut4_matmul(x2, *ops[1:], A=A, B=B)
            else:
                y = kernels.sparse24_w4_matmul(x2, *ops[1:], A=A, B=B)
            fix = self.sparse_correction()
            if fix is not None:  # outliers: their exact values over what the codes gave
                y = kernels.add_sparse(y, x2, *fix)
            y = y.reshape(*x.shape[:-1], self.out_features)
            bias = self.tensors().get("bias")
            return y + bias.to(y.dtype) if bias is not None else y
        W, A, B = self.weight_and_adapters()
        bias = self.tensors().get("bias")
        dtype = x.dtype
        y = F.linear(x, W.to(dtype), None) if W is not None else 0
        if A is not None:
            y = y + F.linear(F.linear(x, A.to(dtype)), B.to(dtype))
        if bias is not None:
            y = y + bias.to(dtype)
        return y

    def extra_repr(self) -> str:
        q = self.meta.get("quant")
        return (f"in={self.in_features}, out={self.out_features}, quant={q and (q['bits'], q['group_size'])}, "
                f"nm={self.meta.get('nm')}, adapter={self.meta.get('adapter')}")
