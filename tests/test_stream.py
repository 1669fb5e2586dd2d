"""model.offload=disk: a model built on the meta device, its blocks read from the safetensors shards
one at a time, written straight into the packed checkpoint, and evaluated block by block. The
streamed run must give the same checkpoint bytes and the same perplexity as the in-memory run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, OPTConfig

from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.eval.ppl import perplexity
from compresslab.eval.zeroshot import ZeroShot
from compresslab.models.loaders import HFModel, byte_tokenizer
from compresslab.pipeline import Pipeline
from compresslab.quantizer.rtn import RTN
from compresslab.recovery.finetune import Finetune
from compresslab.stream import StreamedModel, streamed_model

from conftest import ROOT, needs_data


def _save(model, folder: Path, shard="60KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)  # several shards: blocks span files
    byte_tokenizer().save_pretrained(folder)
    return folder


def _llama(layers=4, tied=False):
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _opt():
    cfg = OPTConfig(vocab_size=257, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, bos_token_id=256, eos_token_id=256, pad_token_id=1, dropout=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _neox():
    cfg = GPTNeoXConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("build", [lambda: _llama(tied=True), _opt, _neox], ids=["llama-tied", "opt", "gpt_neox"])
def test_streamed_model_matches_the_loaded_one(build, tmp_path, monkeypatch):
    """Non-block modules load once (tied head stays tied, rotary computed), blocks stay on meta until
    loaded, and block-by-block perplexity (logits in slices of positions that do not divide the
    window) equals the whole model's."""
    monkeypatch.setattr("compresslab.eval.ppl.STREAM_ROWS", 7)
    model = build()
    folder = _save(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    sm, source = streamed_model(folder, loaded.config, torch.float32)
    blocks = source.adapter.block_list(sm)
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for p in sm.get_input_embeddings().parameters())
    if loaded.config.tie_word_embeddings:
        assert sm.get_output_embeddings().weight is sm.get_input_embeddings().weight
    ids = torch.randint(0, 256, (3 * 48,), generator=torch.Generator().manual_seed(1))
    want, n = perplexity(loaded, ids, 48, progress=False)
    got, m = perplexity(StreamedModel(sm, source, SequentialEngine(progress=False)), ids, 48, progress=False)
    assert n == m and got == pytest.approx(want, rel=1e-6)
    assert source.max_live == 1 and source.live == 0 and source.loads == len(blocks)
    assert all(p.is_meta for p in blocks.parameters())  # every block freed again


def _resident_kb(path: Path) -> int:
    """kB of `path`'s pages this process has resident (Linux /proc/self/smaps)."""
    total, here = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line: range perms offset dev
            here = line.endswith(str(path))
        elif here and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc/self/smaps")
@pytest.mark.parametrize("tied", [False, True])
def test_reread_outside_drops_the_pages_the_writer_touched(tmp_path, tied):
    """After something reads the whole embedding and head (the packed checkpoint's writer does), a
    re-read gives the same values from fresh mappings with (almost) none of the shard resident; the
    head stays tied and the blocks stay on the meta device."""
    from compresslab.stream import reread_outside

    cfg = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)  # one shard; the embedding is 2 MB
    shard = folder / "model.safetensors"
    sm, source = streamed_model(folder, AutoModelForCausalLM.from_config(cfg).config, torch.float32)
    outside = {k: v.clone() for k, v in sm.state_dict().items() if not v.is_meta}
    emb = sm.get_input_embeddings().weight
    float(emb.sum()), float(sm.get_output_embeddings().weight.sum())  # every page touched
    assert _resident_kb(shard) >= 2048 * (1 if tied else 2) * 0.9
    del emb  # (a reference kept elsewhere would keep its mapping, and its pages, alive)
    reread_outside(sm, source)
    assert _resident_kb(shard) < 256
    got = {k: v for k, v in sm.state_dict().items() if not v.is_meta}
    assert got.keys() == outside.keys() and all(torch.equal(got[k], outside[k]) for k in got)
    assert (sm.get_output_embeddings().weight is sm.get_input_embeddings().weight) == tied
    assert all(p.is_meta for p in source.adapter.block_list(sm).parameters())


def _run(args, out: Path):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@needs_data
def test_offload_gives_the_same_checkpoint_and_ppl(tmp_path):
    """sparsegpt 2:4 + gptq W4 through run.py, in memory and streamed: the packed checkpoints are the
    same bytes (several shards), the dense and compressed ppl agree, and the streamed run held one
    block at a time."""
    folder = _save(_llama(layers=4), tmp_path / "m")
    common = [f"model=hf", f"model.name_or_path={folder}", "pruner=sparsegpt", "pruner.pattern=2:4",
              "quantizer=gptq", "quantizer.bits=4", "quantizer.group_size=32", "data.nsamples=4", "data.seqlen=32",
              "eval.seqlen=64", "eval.max_windows=3", "eval.dense_baseline=true", "logger=none",
              "engine.progress=false", "eval.progress=false", "save.max_shard_size=40KB"]
    mem = _run([*common, f"save.path={tmp_path / 'a'}"], tmp_path / "run_a")
    disk = _run([*common, f"save.path={tmp_path / 'b'}", "model.offload=disk"], tmp_path / "run_b")
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(ma["files"]) > 1 and ma["files"] == mb["files"]  # same names, sizes and sha256
    assert ma["layers"] == mb["layers"] and ma["tensors"] == mb["tensors"]
    a, b = mem["metrics"], disk["metrics"]
    assert b["dense/ppl/wikitext2"] == pytest.approx(a["dense/ppl/wikitext2"], rel=1e-6)
    # in memory the eval runs on the fp32 effective weights; streamed, on the packed ones (fp16 scales)
    assert b["ppl/wikitext2"] == pytest.approx(a["ppl/wikitext2"], rel=1e-3)
    assert b["sparsity"] == a["sparsity"] == 0.5 and b["avg_bits"] == a["avg_bits"]
    assert [r["rel_error"] for r in disk["layers"]] == [r["rel_error"] for r in mem["layers"]]
    assert b["stream/max_live_blocks"] == 1 and "stream/max_live_blocks" not in a


def test_offload_errors_before_loading(tmp_path):
    folder = _save(_llama(layers=2), tmp_path / "m")

    class NoLoad(HFModel):
        def load_streamed(self):
            raise AssertionError("the model must not be loaded before validation")

    with pytest.raises(ConfigError, match=r"model.offload='ram' is not known; use null .* or disk"):
        HFModel(str(folder), offload="ram")
    loader = NoLoad(str(folder), offload="disk", device="cpu")
    with pytest.raises(ConfigError, match=r"set save.path"):
        Pipeline(model=loader, quantizer=RTN(bits=4, group_size=32)).run()
    with pytest.raises(ConfigError, match=r"use eval=ppl or eval=null"):
        Pipeline(model=loader, eval=ZeroShot(tasks=["piqa"])).run()
    with pytest.raises(ConfigError, match=r"block-wise recovery"):
        Pipeline(model=loader, recovery=Finetune(), save={"path": str(tmp_path / "c")}).run()
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ConfigError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        streamed_model(folder, loader.config(), torch.float32)


def test_streamed_beam_recovery_holds_its_group_and_matches_in_memory(tmp_path):
    """A block-wise recovery under offload: BEAM with block_granularity=2 keeps exactly its group's two
    blocks materialised, and the checkpoint equals the in-memory run's tensor for tensor."""
    from safetensors.torch import load_file

    from compresslab.checkpoint.io import CheckpointWriter, save_compressed
    from compresslab.models.adapters import adapter_for
    from compresslab.recovery.beam import Beam
    from compresslab.stream import BlockSink

    folder = _save(_llama(layers=4), tmp_path / "m")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))

    def stages():
        return [RTN(bits=3, group_size=32)], Beam(block_granularity=2, epochs=1, batch_size=4)

    mem = AutoModelForCausalLM.from_pretrained(folder).eval()
    q, rec = stages()
    SequentialEngine(progress=False).run(mem, ids, q, rec)
    save_compressed(mem, tmp_path / "a")
    sm, source = streamed_model(folder, mem.config, torch.float32)
    writer = CheckpointWriter(tmp_path / "b", adapter_for(sm))
    q, rec = stages()
    res = SequentialEngine(progress=False).run(sm, ids, q, rec, source=source, sink=BlockSink(writer, adapter_for(sm)))
    writer.finish(sm)
    assert source.max_live == 2 and source.live == 0 and len(res["recovery"]) == 2
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
