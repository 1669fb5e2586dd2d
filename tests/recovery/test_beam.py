import copy

import pytest
import torch
from torch import nn

from compresslab import compress, recover
from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.lowrank.slim import SLiMLoRA
from compresslab.models.loaders import TinyModel
from compresslab.pruner.masks import nm_valid
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.gptq import GPTQ
from compresslab.quantizer.rtn import RTN
from compresslab.recovery.beam import Beam
from compresslab.recovery.finetune import Finetune
from compresslab.stages import layer_state


def tiny(layers=2):
    model, tok = TinyModel("llama", hidden_size=64, intermediate_size=128, num_layers=layers).load()
    return model, tok


def test_beam_reduces_held_out_loss_and_keeps_masks_and_grid():
    model, _ = tiny()
    ids = torch.randint(0, 200, (16, 32), generator=torch.Generator().manual_seed(0))
    beam = Beam(mode="online", epochs=4, lr=1e-3, batch_size=4, val_fraction=0.25)
    stages = [Wanda(0.5, "2:4"), RTN(bits=3, group_size=32)]
    masks = {}

    class Snapshot:  # records each Linear's mask right after one-shot compression
        needs = frozenset()

        def check(self, name, layer):
            pass

        def compress(self, name, layer, stats):
            masks[name] = layer.weight.detach() != 0

    res = SequentialEngine("cpu", progress=False).run(model, ids, stages + [Snapshot()], beam)
    rows = res["recovery"]
    assert len(rows) == 2
    assert all(r["loss_after"] < r["loss_before"] for r in rows)
    named = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and layer_state(m) is not None}
    for n, lin in named.items():
        st = layer_state(lin)
        W = lin.weight.detach()
        torch.testing.assert_close(st.quant.encode(W).dequantize(), W, atol=1e-6, rtol=0)  # on the grid
        assert torch.all(W[~masks[n]] == 0) and nm_valid(W != 0, (2, 4))  # mask unchanged


def test_online_and_offline_targets_differ():
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (8, 16))
    seen = {}

    class Spy(Beam):
        def _train_or_resume(self, forward, group, x, target, first):
            seen.setdefault(self.mode, []).append((x.clone(), target.clone()))
            return {}

    for mode in ("online", "offline"):
        model, _ = tiny()
        SequentialEngine("cpu", progress=False).run(model, ids, [RTN(bits=2, group_size=32)], Spy(mode=mode))
    (x_on0, t_on0), (x_on1, t_on1) = seen["online"]
    (x_off0, t_off0), (x_off1, t_off1) = seen["offline"]
    torch.testing.assert_close(x_on0, x_off0)  # block 0: both start from the embeddings
    assert not torch.allclose(x_on1, x_off1)  # block 1: compressed stream vs dense stream
    assert not torch.allclose(t_on1, t_off1)


def test_granularity_and_resume(tmp_path):
    ids = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(1))
    model, _ = tiny(layers=4)
    beam = Beam(block_granularity=2, epochs=1, lr=1e-3, batch_size=4, checkpoint_dir=str(tmp_path))
    res = SequentialEngine("cpu", progress=False).run(model, ids, [RTN(bits=3, group_size=32)], beam)
    assert len(res["recovery"]) == 2 and sorted(p.name for p in tmp_path.glob("*.json")) == [
        "blocks_0_1.json", "blocks_2_3.json"]
    model2, _ = tiny(layers=4)
    res2 = SequentialEngine("cpu", progress=False).run(model2, ids, [RTN(bits=3, group_size=32)], beam)
    assert all(r.get("resumed") for r in res2["recovery"])
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b)


def test_recover_a_model_compressed_elsewhere():
    dense, tok = tiny()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(2))
    compress(model, pruner=Wanda(0.5, "2:4"), quantizer=RTN(bits=3, group_size=32), calibration=ids,
             engine=SequentialEngine("cpu", progress=False))
    report = recover(dense, model, recovery=Beam(epochs=2, lr=1e-3, batch_size=4), calibration=ids,
                     engine=SequentialEngine("cpu", progress=False))
    assert len(report.recovery) == 2 and report.recovery[0]["loss_after"] <= report.recovery[0]["loss_before"]


def test_four_stage_run_with_finetune_keeps_constraints():
    model, _ = tiny()
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(3))
    report = compress(model, pruner=SparseGPT(0.5, "2:4"), quantizer=GPTQ(bits=4, group_size=32),
                      lowrank=SLiMLoRA(rank=4), recovery=Finetune(steps=3, seqlen=32, batch_size=2, lr=1e-3),
                      calibration=ids, engine=SequentialEngine("cpu", progress=False))
    assert report.recovery[-1]["trained"] == "adapters" and len(report.recovery[-1]["curve"]) == 3
    for n, lin in model.named_modules():
        st = layer_state(lin) if isinstance(lin, nn.Linear) else None
        if st is None:
            continue
        W = lin.weight.detach()
        assert nm_valid(W != 0, (2, 4)) and lin.lora_A.shape[0] == 4
        torch.testing.assert_close(st.quant.encode(W).dequantize(), W, atol=1e-6, rtol=0)


def test_bad_recovery_options():
    with pytest.raises(ConfigError, match="mode"):
        Beam(mode="sideways")
    with pytest.raises(ConfigError, match="optimizer"):
        Beam(optimizer="lion")
    with pytest.raises(ConfigError, match="val_fraction"):
        Beam(lr_search=True, val_fraction=0.0)


def test_lr_search_picks_by_held_out_loss():
    model, _ = tiny()
    ids = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(4))
    beam = Beam(epochs=1, batch_size=4, lr_search=True, lr_grid=(1e-3, 1e-6), val_fraction=0.25)
    res = SequentialEngine("cpu", progress=False).run(model, ids, [RTN(bits=2, group_size=32)], beam)
    assert all(r["lr"] in (1e-3, 1e-6) and r["loss_after"] <= r["loss_before"] for r in res["recovery"])
