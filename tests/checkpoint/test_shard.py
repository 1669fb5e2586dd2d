"""The incremental safetensors writer: what it writes, safetensors reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compresslab.checkpoint.shard import ShardFile


def test_safetensors_reads_back_every_dtype_and_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),  # before wider ones
        "w.qweight": torch.randint(-2**31, 2**31 - 1, (5, 3), dtype=torch.int32, generator=g),
        "w.scales": torch.randn(4, 6, generator=g).half(),
        "bf": torch.randn(3, 2, 2, generator=g).bfloat16(),
        "f32": torch.randn(9, generator=g),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }
    f = ShardFile(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        f.add(k, v)
    f.close()
    back = load_file(str(tmp_path / "x.safetensors"))  # validates offsets and sizes
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"}
        assert torch.equal(sf.get_tensor("w.scales"), tensors["w.scales"])
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0  # the data starts aligned
    import json

    header = json.loads(raw[8 : 8 + n])
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}
    for k, e in header.items():
        if k != "__metadata__":
            assert e["data_offsets"][0] % sizes[e["dtype"]] == 0, k  # every tensor aligned to its element size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # spools removed


def test_unknown_dtype_is_refused(tmp_path):
    f = ShardFile(tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="complex"):
        f.add("c", torch.zeros(2, dtype=torch.complex64))
    f.discard()
