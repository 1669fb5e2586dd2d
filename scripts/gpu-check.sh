#!/usr/bin/env bash
# The one prepared check of compresslab's CUDA paths, for a machine with a GPU (the device tool lends an
# H200 to some sessions: 15 minutes in all, no network, only the working tree carried). Run it ONCE:
#
#   scripts/gpu-check.sh            # here: writes experiments/results/gpu_check.md (and $OUT/ when set)
#
# It needs python3 with torch (CUDA), transformers and triton (the device image has them); compresslab
# itself is used from this checkout (no install: src/ plus kernels/ as compresslab.kernels).
# Checks (each a row of the table; a failing check prints its error and the script goes on):
#   beam_granularity2_cuda  BEAM with block_granularity=2, engine on cuda, model home on the CPU:
#                           every parameter a training step touches is on cuda (issue 13)
#   finetune_cuda           recovery=finetune with engine.device=cuda on a model left on the CPU:
#                           the training step's weights and batch are on cuda (issue 13)
#   obs_block_sweep         the fused Triton block sweep vs the torch column loop on cuda, a Llama-2-7B
#                           down_proj (4096 x 11008) GPTQ W4 g128: seconds each, codes agreeing (issue 14)
#   plan_hidden_on_host     engine on cuda with a max_memory that holds no more than the block and one chunk:
#                           the plan keeps hidden states on the host (pinned), chunks move; outputs equal
#                           the unconstrained one-pass run's, peak device memory within the budget (issue 15)
#   kernels                 experiments/bench/kernels.py: int4 and 2:4+int4 kernels vs fp16 (issue 8)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=experiments/results
LIB=$(mktemp -d)
cp -r src/compresslab "$LIB/compresslab"
cp -r kernels "$LIB/compresslab/kernels"
export PYTHONPATH="$LIB:src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

"$PY" - <<'EOF' | tee "$RESULTS/gpu_check.md"
import time, traceback

import torch

rows = []


def check(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            rows.append((name, "ok", detail))
        except Exception as e:  # noqa: BLE001 - every check reports, the next one runs
            traceback.print_exc()
            rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:300]))
        rows[-1] = (*rows[-1], f"{time.perf_counter() - t0:.1f}")
        return fn
    return wrap


print(f"# GPU check\n\n- device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
      f"\n- torch {torch.__version__}\n")


@check("beam_granularity2_cuda")
def _():
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import TinyModel
    from compresslab.quantizer.rtn import RTN
    from compresslab.recovery.beam import Beam

    devices = []

    class Watch(Beam):
        def _fit(self, forward, blocks, x, target, lr, n_train):
            devices.append({p.device.type for b in blocks for p in b.parameters()} | {x.device.type})
            return super()._fit(forward, blocks, x, target, lr, n_train)

    model, _ = TinyModel("llama", hidden_size=256, intermediate_size=512, num_layers=4, device="cpu").load()
    ids = torch.randint(0, 200, (16, 64))
    res = SequentialEngine("cuda", progress=False).run(model, ids, [RTN(bits=3, group_size=64)],
                                                        Watch(block_granularity=2, epochs=1, batch_size=4))
    assert devices == [{"cuda"}, {"cuda"}], devices
    assert all(p.device.type == "cpu" for p in model.parameters())
    return f"2 groups trained on cuda, losses {[round(r['loss_before'], 5) for r in res['recovery']]}"


@check("finetune_cuda")
def _():
    import compresslab.recovery.finetune as ft
    from compresslab import compress
    from compresslab.engine import SequentialEngine
    from compresslab.lowrank.naive import NaiveSVD
    from compresslab.models.loaders import TinyModel
    from compresslab.quantizer.rtn import RTN

    seen, real = [], ft.functional_call

    def spy(module, weights, args, kwargs, strict=False):
        seen.append({t.device.type for t in [*weights.values(), kwargs["input_ids"]]})
        return real(module, weights, args, kwargs, strict=strict)

    ft.functional_call = spy
    model, _ = TinyModel("llama", hidden_size=256, intermediate_size=512, num_layers=2, device="cpu").load()
    ids = torch.randint(0, 200, (8, 64))
    rep = compress(model, quantizer=RTN(bits=4, group_size=64), lowrank=NaiveSVD(rank=8),
                   recovery=ft.Finetune(steps=3, seqlen=64, batch_size=2), calibration=ids,
                   engine=SequentialEngine("cuda", progress=False))
    ft.functional_call = real
    assert seen and all(s == {"cuda"} for s in seen), seen
    return f"{len(seen)} steps on cuda, loss {rep.recovery[-1]['finetune_loss_first']:.3f} -> {rep.recovery[-1]['finetune_loss_last']:.3f}"


@check("obs_block_sweep")
def _():
    import compresslab.obs as obs

    torch.manual_seed(0)
    d, out = 11008, 4096
    X = torch.randn(8192, d, device="cuda")
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(out, d, device="cuda") * 0.02
    spec = obs.GridSpec(4, 128, "asym")
    times = {}
    for name in ("fused", "torch"):
        if name == "torch":
            obs.fused_block_sweep = lambda *a: None
        obs.obs_compress(W[:256], H[:1024, :1024], quant=spec)  # warm-up / compile
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        W_hat, qw, _ = obs.obs_compress(W, H, quant=spec)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t0, qw.encode(W_hat).codes)
    same = (times["fused"][1] == times["torch"][1]).float().mean().item()
    assert same > 0.99, same
    return (f"fused {times['fused'][0]:.2f} s, torch {times['torch'][0]:.2f} s "
            f"({times['torch'][0] / times['fused'][0]:.1f}x), codes agree {same:.5f}")


@check("plan_hidden_on_host")
def _():
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import TinyModel
    from compresslab.plan import Shape, estimate

    model, _ = TinyModel(num_layers=4, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4,
                         device="cpu", dtype="float32").load()
    ids = torch.randint(0, 256, (64, 512))

    class Observe:
        needs = frozenset({"hessian"})
        def check(self, name, layer): pass
        def compress(self, name, layer, stats): stats.hessian

    ref = SequentialEngine("cuda", max_memory=None, progress=False).run(model, ids, [Observe()], keep_outputs=True)
    n, t = ids.shape
    budget = estimate(Shape.of(model.config), n, t, 8, hidden_on_host=True) + 1
    torch.cuda.reset_peak_memory_stats()
    eng = SequentialEngine("cuda", max_memory=budget, progress=False)
    out = eng.run(model, ids, [Observe()], keep_outputs=True)
    peak = torch.cuda.max_memory_allocated()
    assert eng.plan.hidden_on_host and out["outputs"].device.type == "cpu", eng.plan
    err = ((out["outputs"] - ref["outputs"].cpu()).norm() / ref["outputs"].norm()).item()
    assert err < 1e-5, err
    return f"{eng.plan.describe()}; device peak {peak / 1e9:.3f} GB; outputs rel diff {err:.1e}"


print("| check | result | detail | seconds |\n|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
EOF

echo
echo "## kernels (experiments/bench/kernels.py)"
timeout 300 "$PY" experiments/bench/kernels.py --iters 50 > "$LIB/kernels.log" 2>&1 \
    && echo "ok: see $RESULTS/kernels.md" || { echo "FAIL (exit $?)"; tail -20 "$LIB/kernels.log"; }
if [[ -n "${OUT:-}" ]]; then
    cp "$RESULTS/gpu_check.md" "$RESULTS/kernels.md" "$RESULTS/kernels.json" "$OUT/" 2>/dev/null || true
fi
rm -rf "$LIB"
