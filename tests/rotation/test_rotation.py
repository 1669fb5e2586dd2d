"""Rotations (QuaRot, SpinQuant): Hadamard constructions against dense references, the rotated dense
model computes the same logits, outliers are spread, the online Hadamard survives the engine's chunked
path and the packed checkpoint, SpinQuant's Cayley SGD stays orthogonal and lowers its loss, and
what cannot be rotated is refused with the reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compresslab import compress
from compresslab.checkpoint import load_compressed, save_compressed
from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.models.loaders import TinyModel
from compresslab.quantizer.gptq import GPTQ
from compresslab.rotation.base import OnlineHadamard, _check_rmsnorm, fuse_norms
from compresslab.rotation.hadamard import (base_order, hadamard_matrix, hadamard_transform, random_hadamard,
                                           random_orthogonal)
from compresslab.rotation.quarot import QuaRot
from compresslab.rotation.spinquant import SpinQuant, cayley_step, rtn_ste
from compresslab.stages import layer_state
from conftest import needs_data
from test_sweeps import run  # run.py in a subprocess, quiet

ROOT = Path(__file__).resolve().parents[2]


# -- Hadamard matrices ---------------------------------------------------------------------------------------
def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 28, 36, 40, 44, 48, 60, 64, 96, 192, 576, 1536])
def test_hadamard_is_orthogonal_with_entries_plus_minus_one_over_sqrt_n(n):
    H = hadamard_matrix(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((H * n ** 0.5).abs(), torch.ones(n, n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n,k", [(64, 1), (576, 36), (1536, 12), (96, 12), (40, 20), (1024, 1), (3072, 12)])  # 2^m > 128: GEMM + butterflies
def test_fast_transform_equals_the_dense_kronecker_product(n, k):
    """x @ (H_K ⊗ H_S)/√n, the dense product built here from the base matrix and Sylvester's doubling."""
    assert base_order(n) == k
    HK = hadamard_matrix(k) * k ** 0.5 if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    dense = torch.kron(HK, sylvester(n // k)) / n ** 0.5
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ dense, atol=1e-10)


def test_orders_without_a_known_hadamard_fall_back_or_refuse():
    assert base_order(52) is None and base_order(11008) is None  # 52 = 4·13; Llama-2-7B's intermediate
    g = torch.Generator().manual_seed(0)
    for Q in (random_hadamard(52, g).matrix(), random_orthogonal(52, g)):
        assert torch.allclose(Q @ Q.T, torch.eye(52, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ConfigError, match="online_down=false"):
        OnlineHadamard(11008)


def test_randomised_hadamard_is_signs_times_hadamard():
    Q = random_hadamard(64, torch.Generator().manual_seed(3)).matrix()
    ratio = Q / hadamard_matrix(64)
    signs = ratio[:, 0]
    assert set(signs.round().tolist()) == {-1.0, 1.0}
    assert torch.allclose(ratio, signs[:, None].expand(64, 64), atol=1e-12)


# -- the rotated dense model ---------------------------------------------------------------------------------
def _model(family="llama", tie=True, hidden=96, inter=192, layers=2, heads=6, kv=2, seed=0):
    torch.manual_seed(seed)
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    m = cls(cfg(vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)).eval()
    with torch.no_grad():  # norms and biases away from their init, so that a wrong fusion shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "bias" in n:
                p.normal_()
    return m


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("rotation", [QuaRot(seed=1), QuaRot(randomize=False), QuaRot(online_down=False),
                                      SpinQuant(iters=2, bits=3, batch_size=2)])
def test_rotated_model_gives_the_same_logits(family, tie, rotation):
    m = _model(family, tie)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ref = m(ids).logits
    emb = m.model.embed_tokens.weight.detach().clone()
    rotation.apply(m, ids)
    with torch.no_grad():
        out = m(ids).logits
    assert rel(out, ref) <= 1e-4
    assert rel(m.model.embed_tokens.weight, emb) > 0.5  # it did rotate (a no-op would pass the line above)
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert not m.config.tie_word_embeddings
    hooked = [n for n, mod in m.named_modules() if layer_state(mod) is not None and layer_state(mod).online]
    assert hooked == ([f"model.layers.{i}.mlp.down_proj" for i in range(2)] if rotation.online_down else [])


def test_fusion_alone_is_exact_and_sets_norms_to_one():
    m = _model()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = m(ids).logits
    fuse_norms(m)
    for name, p in m.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    with torch.no_grad():
        assert rel(m(ids).logits, ref) <= 1e-5


def test_rotation_spreads_an_outlier_channel():
    """QuaRot's point: a residual channel 50x larger than the rest is spread over all channels, so the
    input of q_proj (after the norm) has a max/rms ratio near a Gaussian's, not the outlier's."""
    m = _model(hidden=96)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 7] *= 50
    seen = {}
    m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    ids = torch.randint(0, 300, (4, 32))

    def crest():
        with torch.no_grad():
            m(ids)
        x = seen["x"].reshape(-1, 96)
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    before = crest()
    QuaRot().apply(m)
    after = crest()
    assert before > 8 and after < 4.5, (before, after)  # a lone outlier: ~√96 ≈ 9.8; Gaussian: ~2.5-3.5


def test_norm_check_refuses_layernorm_and_one_plus_w():
    ln = nn.LayerNorm(16)
    with pytest.raises(ConfigError, match="LayerNorm"):
        _check_rmsnorm("x", ln)  # it has a bias

    class OnePlus(nn.Module):  # Gemma's (1 + w) scale
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(16))

        def forward(self, x):
            return (1 + self.weight) * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    with pytest.raises(ConfigError, match="does not compute"):
        _check_rmsnorm("x", OnePlus())
    mean_sub = nn.LayerNorm(16, bias=False)
    with pytest.raises(ConfigError, match="does not compute"):
        _check_rmsnorm("x", mean_sub)


@pytest.mark.parametrize("family", ["opt", "gemma3_text"])
def test_families_without_a_residual_layout_are_refused_before_loading(family, tmp_path):
    from compresslab.pipeline import Pipeline

    p = Pipeline(model=TinyModel(family=family), rotation=QuaRot(), engine=SequentialEngine(device="cpu"))
    with pytest.raises(ConfigError, match="residual layout"):
        p.validate()


# -- the engine and the checkpoint ---------------------------------------------------------------------------
def _tiny(seed=0):
    m, _ = TinyModel(hidden_size=96, intermediate_size=192, num_heads=6, num_kv_heads=2, seed=seed,
                     device="cpu").load()
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def test_chunked_engine_applies_the_online_hadamard_once():
    """The chunked path keeps down_proj's input and computes h + down(p) itself; p must be the input
    before the online Hadamard (which down applies), or the next block reads a twice-rotated branch."""
    ids = torch.randint(0, 257, (8, 32))
    outs = []
    for chunk in (None, 2):
        m = _tiny()
        QuaRot().apply(m)
        eng = SequentialEngine(device="cpu", chunk_size=chunk, progress=False, max_memory=None)
        compress(m, quantizer=GPTQ(bits=8, group_size=32), calibration=ids, engine=eng)
        if chunk is not None:
            assert eng.plan.keep_mlp_input  # the path under test ran
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert rel(outs[1], outs[0]) < 1e-3


def test_packed_checkpoint_keeps_the_online_hadamard(tmp_path):
    ids = torch.randint(0, 257, (4, 32))
    m = _tiny()
    QuaRot().apply(m)
    compress(m, quantizer=GPTQ(bits=4, group_size=32), calibration=ids,
             engine=SequentialEngine(device="cpu", progress=False))
    manifest = save_compressed(m, tmp_path / "ck")
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["online"] == {"kind": "hadamard", "n": 192}
    assert "online" not in manifest["layers"]["model.layers.0.mlp.up_proj"]
    loaded, _ = load_compressed(tmp_path / "ck")
    with torch.no_grad():
        ref, out = m(ids).logits, loaded(ids).logits
    assert rel(out, ref) < 1e-2  # as any packed model (fp16 storage of the other tensors)
    # without the transform the loaded model is far off: the hook is what makes it right
    loaded.model.layers[0].mlp.down_proj.online = None
    with torch.no_grad():
        assert rel(loaded(ids).logits, ref) > 0.05


def test_packed_layer_applies_the_online_hadamard_before_activation_quantization(tmp_path):
    """down_proj with int4 activations: the Hadamard first, then the per-token rounding, in memory (hook
    order) and once loaded (PackedLinear); the other order gives a different output."""
    m = _tiny()
    QuaRot().apply(m)
    compress(m, quantizer=GPTQ(bits=4, group_size=32, act_bits=4), calibration=torch.randint(0, 257, (4, 32)),
             engine=SequentialEngine(device="cpu", progress=False))
    save_compressed(m, tmp_path / "ck")
    loaded, _ = load_compressed(tmp_path / "ck")
    down, packed = m.model.layers[1].mlp.down_proj, loaded.model.layers[1].mlp.down_proj
    x = torch.randn(3, 7, 192)
    with torch.no_grad():
        ref, out = down(x), packed(x)
        assert rel(out, ref) < 1e-3
        swapped = torch.nn.functional.linear(hadamard_transform(packed.act(packed, (x,))[0]), down.weight, down.bias)
        assert rel(swapped, ref) > 1e-2


def test_export_refuses_the_online_hadamard(tmp_path):
    from compresslab.export import export_compressed_tensors

    m = _tiny()
    QuaRot().apply(m)
    compress(m, quantizer=GPTQ(bits=4, group_size=32), calibration=torch.randint(0, 257, (4, 32)),
             engine=SequentialEngine(device="cpu", progress=False))
    with pytest.raises(ConfigError, match="online Hadamard"):
        export_compressed_tensors(m, tmp_path / "ex")


# -- SpinQuant -----------------------------------------------------------------------------------------------
def test_cayley_step_stays_orthogonal_and_descends():
    """f(R) = ‖R − T‖² for an orthogonal target T: Cayley SGD with a small step lowers f, keeps RᵀR = I."""
    g = torch.Generator().manual_seed(0)
    T, R = random_orthogonal(16, g), random_orthogonal(16, g)
    f = [float((R - T).norm() ** 2)]
    for _ in range(50):
        R = cayley_step(R, 2 * (R - T), 0.05)
        f.append(float((R - T).norm() ** 2))
    assert torch.allclose(R.T @ R, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert f[-1] < 0.5 * f[0] and all(b <= a + 1e-9 for a, b in zip(f, f[1:]))


def test_rtn_ste_values_and_gradient():
    W = torch.randn(4, 8, requires_grad=True)
    q = rtn_ste(W, 2, -1)
    lo, hi = W.detach().amin(1, keepdim=True).clamp(max=0), W.detach().amax(1, keepdim=True).clamp(min=0)
    step = ((hi - lo) / 3).half().float()  # the min/max grid's scale, fp16 as stored
    codes = (q.detach() - lo) / step  # on the grid: 4 levels from min, a whole number of steps (zero rounded)
    zero = torch.round(-lo / step)
    assert torch.allclose(q.detach() / step + zero, torch.round(q.detach() / step + zero), atol=1e-4)
    assert (torch.round(q.detach() / step + zero).unique().numel() <= 4) and codes.isfinite().all()
    assert (q.detach() - W.detach()).abs().max() <= step.max() / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(W.grad, torch.ones_like(W))  # straight through


def test_spinquant_with_no_steps_is_quarot():
    a, b = _model(), _model()
    QuaRot(seed=5).apply(a)
    SpinQuant(seed=5, iters=0).apply(b)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_spinquant_lowers_the_quantized_loss_it_trains_on(tmp_path):
    """On one fixed batch, the fake-quantised model's loss at the learned rotation is below the loss at
    its start (QuaRot's), both computed here through the training's own forward."""
    m = _model(layers=2, seed=1)
    ids = torch.randint(0, 300, (4, 24))
    sq = SpinQuant(seed=0, bits=2, act_bits=4, iters=25, lr=1.0, batch_size=4)
    sq.apply(m, ids, tmp_path)
    assert sq.curve[-1] < sq.curve[0] - 0.01, sq.curve
    # the saved rotation is reused as is
    m2 = _model(layers=2, seed=1)
    SpinQuant(path=str(tmp_path / "spinquant.safetensors")).apply(m2)
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_spinquant_saved_rotation_for_another_model_is_refused(tmp_path):
    SpinQuant(iters=0).apply(_model(hidden=96), None, tmp_path)
    with pytest.raises(ConfigError, match="another model"):
        SpinQuant(path=str(tmp_path / "spinquant.safetensors")).apply(_model(hidden=48, inter=96))
    with pytest.raises(ConfigError, match="is not a file"):
        SpinQuant(path=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("kw,match", [({"iters": -1}, "iters"), ({"bits": 1}, "bits"), ({"act_bits": 9}, "act_bits"),
                                      ({"lr": 0}, "lr"), ({"batch_size": 0}, "batch_size"),
                                      ({"group_size": 0}, "group_size"), ({"online_down": "yes"}, "online_down")])
def test_bad_spinquant_options_fail_at_once(kw, match):
    with pytest.raises(ConfigError, match=match):
        SpinQuant(**kw)


# -- through run.py ------------------------------------------------------------------------------------------
TINY = ["model=tiny_llama", "model.hidden_size=96", "model.intermediate_size=192", "model.num_heads=6",
        "data.nsamples=4", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2", "engine.progress=false",
        "eval.progress=false", "logger=none"]


@needs_data
def test_rotation_composes_with_every_stage_in_a_sweep(tmp_path):
    """QuaRot in front of each pruner and quantizer (with int4 activations): every job ok, 2:4 sparsity, the
    rotation timed (low-rank, recovery and the dense ppl: the next test)."""
    sweep = tmp_path / "sw"
    out = run(["-m", *TINY, "rotation=quarot", "pruner=magnitude,wanda,sparsegpt", "pruner.pattern=2:4",
               "quantizer=rtn,gptq,slim_llm", "quantizer.bits=4", "quantizer.group_size=32", "quantizer.act_bits=4",
               f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(recs) == 9
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert r["method"].startswith("quarot+")
        assert r["metrics"]["sparsity"] == pytest.approx(0.5)
        assert r["metrics"]["time/rotation_s"] > 0


@needs_data
def test_rotation_dense_ppl_and_lowrank_recovery_save(tmp_path):
    run_dir, ck = tmp_path / "run", tmp_path / "ck"
    out = run([*TINY, "rotation=spinquant", "rotation.iters=2", "pruner=sparsegpt", "pruner.pattern=2:4",
               "quantizer=gptq", "quantizer.group_size=32", "lowrank=slim", "recovery=beam",
               "eval.dense_baseline=true", f"save.path={ck}", f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((run_dir / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["method"] == "spinquant+sparsegpt+gptq+slim+beam"
    assert (run_dir / "spinquant.safetensors").is_file()
    assert rec["metrics"]["rotation/iters"] == 2
    loaded, tok = load_compressed(ck)
    assert loaded.model.layers[1].mlp.down_proj.online is not None
    # rotation alone: the dense ppl is the original's
    run_dir2 = tmp_path / "dense"
    out = run([*TINY, "rotation=quarot", "eval.dense_baseline=true", f"hydra.run.dir={run_dir2}"])
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run_dir2 / "metrics.json").read_text())["metrics"]
    assert m["ppl/wikitext2"] == pytest.approx(m["dense/ppl/wikitext2"], rel=1e-4)


@needs_data
def test_bad_rotation_values_fail_before_loading(tmp_path):
    out = run([*TINY, "rotation=spinquant", "rotation.iters=-3", f"hydra.run.dir={tmp_path}"])
    assert out.returncode != 0
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["status"] == "failed" and "rotation.iters" in rec["error"]
    out = run([*TINY, "model.family=opt", "rotation=quarot", f"hydra.run.dir={tmp_path / 'opt'}"])
    rec = json.loads((tmp_path / "opt" / "metrics.json").read_text())
    assert rec["status"] == "failed" and "residual layout" in rec["error"] and "time/load_s" not in rec["metrics"]


def test_fast_orthogonal_equals_its_dense_matrix():
    Q = random_hadamard(576, torch.Generator().manual_seed(0))
    W = torch.randn(40, 576, dtype=torch.float64)
    M = Q.matrix()
    assert torch.allclose(M @ M.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q.right(W), W @ M, atol=1e-12)


@needs_data
def test_readme_rotation_commands_run_as_printed(tmp_path):
    """The README's three rotation commands, read from it, with a tiny model and data appended."""
    from conftest import small_data_dir

    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith(".venv/bin/python run.py") and "rotation=" in ln]
    assert len(lines) == 3, lines
    env = {**os.environ, "COMPRESSLAB_DATA_DIR": str(small_data_dir(tmp_path / "data")), "TQDM_DISABLE": "1"}
    recs = []
    for k, line in enumerate(lines):
        out_dir = tmp_path / f"cmd{k}"
        args = line.split()[2:] + ["model=tiny_llama", "model.hidden_size=128", "model.intermediate_size=256", *TINY[4:],
                                   f"hydra.{'sweep' if '-m' in line.split() else 'run'}.dir={out_dir}"]
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        recs += [json.loads(p.read_text()) for p in out_dir.rglob("metrics.json")]
    assert len(recs) == 1 + 1 + 2
    assert sorted(r["choices"]["rotation"] or "null" for r in recs) == ["null", "quarot", "quarot", "spinquant"]
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert ("time/rotation_s" in r["metrics"]) == (r["choices"]["rotation"] is not None)


def test_report_names_the_rotation(tmp_path):
    from compresslab.report import collect

    for k, rot in enumerate([None, {"_target_": "compresslab.rotation.quarot.QuaRot", "seed": 0}]):
        (tmp_path / str(k)).mkdir()
        cfg = {"rotation": rot, "quantizer": {"_target_": "compresslab.quantizer.rtn.RTN", "bits": 4}}
        (tmp_path / str(k) / "metrics.json").write_text(json.dumps({"status": "ok", "config": cfg, "metrics": {}}))
    rows = collect(tmp_path)
    assert [r.get("rotation") for r in rows] == [None, "quarot"]
    assert [r["method"] for r in rows] == ["rtn", "quarot+rtn"]


def test_error_meter_sees_the_input_after_the_online_hadamard():
    """After recovery the engine re-measures errors with ErrorMeter (a hook ahead of every other): on a rotated
    down_proj it must use the rotated input, as the Hessian did."""
    from compresslab.layer_error import ErrorMeter

    m = _tiny()
    QuaRot().apply(m)
    down = m.model.layers[0].mlp.down_proj
    dense = down.weight.detach().clone()
    with torch.no_grad():
        down.weight.add_(torch.randn_like(dense) * 0.01)
    x = torch.randn(5, 192) * torch.linspace(0.1, 10, 192)  # uneven channels: the Hadamard changes the answer
    meter = ErrorMeter({"d": (down, dense)})
    with meter, torch.no_grad():
        down(x)
    xr = hadamard_transform(x)
    want = float(((dense - down.weight) @ xr.T).norm() / (dense @ xr.T).norm())
    assert meter.results()["d"] == pytest.approx(want, rel=1e-4)


def test_spinquant_training_forward_is_the_rotated_model():
    """With weight rounding off, the loss of SpinQuant's first training step (its own rotated weights and
    hooks) equals the loss of the model itself: ties the training forward to `rotate`."""
    import compresslab.rotation.spinquant as sq_mod

    m = _model(family="qwen2", tie=True)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        want = float(m(ids, labels=ids).loss)
    sq = SpinQuant(iters=1, batch_size=2, lr=1e-9)
    orig = sq_mod.rtn_ste
    sq_mod.rtn_ste = lambda W, *a: W
    try:
        sq.apply(m, ids)
    finally:
        sq_mod.rtn_ste = orig
    assert sq.curve[0] == pytest.approx(want, rel=1e-5)


def test_spinquant_learns_on_a_bf16_model():
    m = _model().to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16))
    sq = SpinQuant(iters=2, bits=4, act_bits=8, batch_size=2)
    sq.apply(m, ids)
    assert all(torch.isfinite(torch.tensor(sq.curve)))
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_bad_norm_anywhere_leaves_the_model_untouched():
    m = _model()
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}

    class Shifted(torch.nn.Module):  # an RMSNorm with an offset: not what a rotation commutes with
        def __init__(self, w):
            super().__init__()
            self.weight = w

        def forward(self, x):
            return self.weight * x / x.pow(2).mean(-1, keepdim=True).sqrt() + 0.1

    m.model.layers[1].post_attention_layernorm = Shifted(m.model.layers[1].post_attention_layernorm.weight)
    with pytest.raises(ConfigError, match="does not compute"):
        QuaRot().apply(m)
    for n, p in m.named_parameters():
        assert torch.equal(p, ref[n]), n
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # still tied
