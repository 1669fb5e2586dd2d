"""The one prepared check of compresslab's CUDA paths (scripts/gpu-check.sh runs it; see there).

    python scripts/gpu_check.py [--out DIR] [--only NAME ...]                     # on the GPU machine
    python scripts/gpu_check.py --device cpu --shape tiny --nsamples 4 --seqlen 32  # the CPU dry run (tests)

Each check is a function that returns a dict of figures (or raises); a failing check is reported
and the next one runs. Checks that mean nothing off a GPU are "skipped" on the CPU. Writes
gpu_check.json and gpu_check.md to --out ($OUT when set, else experiments/results/gpu).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Llama-3-8B's block shapes (the engine check cuts the model to --layers blocks); tiny for the CPU dry run
SHAPES = {
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, layers=32),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, layers=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "experiments" / "results" / "gpu"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the random model the engine check runs")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    ap.add_argument("--only", nargs="*", help="check names to run (default: all)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU; use --device cpu for the dry run")
    if args.layers < 1 or args.nsamples < 1 or args.seqlen < 2:
        ap.error("--layers and --nsamples must be >= 1 and --seqlen >= 2")
    if args.only:
        unknown = sorted(set(args.only) - set(CHECKS))
        if unknown:
            ap.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    args.dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    return args


def random_llama(shape: str, layers: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A random-init Llama with `shape`'s block dimensions cut to `layers` blocks, built on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    d = {k: v for k, v in SHAPES[shape].items() if k != "layers"}
    cfg = LlamaConfig(**d, num_hidden_layers=layers, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class Skip(Exception):
    """A check that means nothing on this device."""


def _cuda(args):
    if not args.device.startswith("cuda"):
        raise Skip("needs cuda")


def _peak(args) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None


def _reset(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_engine_shapes(args) -> dict:
    """GPTQ W4 g128 and sparsegpt 2:4 + gptq W4 g128 on the random model: seconds per block, peak device
    memory, extrapolated to the full depth (llm-compressor reports 745 s for GPTQ on Llama-3-8B, one GPU)."""
    from compresslab import compress
    from compresslab.engine import SequentialEngine
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ

    full = SHAPES[args.shape]["layers"]
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    out = {}
    for name, pruner in (("gptq", None), ("sparsegpt24_gptq", SparseGPT(0.5, "2:4"))):
        model = random_llama(args.shape, args.layers, args.dtype, "cpu")
        _reset(args)
        rep = compress(model, pruner=pruner, quantizer=GPTQ(bits=4, group_size=128), calibration=ids,
                       engine=SequentialEngine(args.device, progress=False))
        s = rep.metrics["time/compress_s"]
        out[name] = {"s_per_block": round(s / args.layers, 2), f"est_{full}_layers_s": round(s / args.layers * full),
                     "peak_device_gib": _peak(args), "sparsity": rep.metrics["sparsity"],
                     "avg_bits": round(rep.metrics["avg_bits"], 3)}
        del model
    return out


def check_beam_granularity2(args) -> dict:
    """BEAM with block_granularity=2, the model's home on the CPU: every parameter a training step
    touches is on the engine's device (issue 13)."""
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import TinyModel
    from compresslab.quantizer.rtn import RTN
    from compresslab.recovery.beam import Beam

    devices = []

    class Watch(Beam):
        def _fit(self, forward, blocks, x, *rest):
            devices.append({p.device.type for b in blocks for p in b.parameters()} | {x.device.type})
            return super()._fit(forward, blocks, x, *rest)

    model, _ = TinyModel("llama", hidden_size=256, intermediate_size=512, num_layers=4, device="cpu").load()
    ids = torch.randint(0, 200, (16, 64), generator=torch.Generator().manual_seed(0))
    res = SequentialEngine(args.device, progress=False).run(model, ids, [RTN(bits=3, group_size=64)],
                                                             Watch(block_granularity=2, epochs=1, batch_size=4))
    want = {torch.device(args.device).type}
    assert devices == [want, want], devices
    assert all(p.device.type == "cpu" for p in model.parameters())
    return {"groups_trained": len(devices), "loss_before": [round(r["loss_before"], 5) for r in res["recovery"]],
            "loss_after": [round(r["loss_after"], 5) for r in res["recovery"]]}


def check_finetune(args) -> dict:
    """recovery=finetune with the engine on the device, the model left on the CPU: the training
    step's weights and batch are on the device (issue 13)."""
    import compresslab.recovery.finetune as ft
    from compresslab import compress
    from compresslab.engine import SequentialEngine
    from compresslab.lowrank.naive import NaiveSVD
    from compresslab.models.loaders import TinyModel
    from compresslab.quantizer.rtn import RTN

    seen, real = [], ft.functional_call

    def spy(module, weights, fargs, kwargs, strict=False):
        seen.append({t.device.type for t in [*weights.values(), kwargs["input_ids"]]})
        return real(module, weights, fargs, kwargs, strict=strict)

    ft.functional_call = spy
    try:
        model, _ = TinyModel("llama", hidden_size=256, intermediate_size=512, num_layers=2, device="cpu").load()
        ids = torch.randint(0, 200, (8, 64), generator=torch.Generator().manual_seed(0))
        rep = compress(model, quantizer=RTN(bits=4, group_size=64), lowrank=NaiveSVD(rank=8),
                       recovery=ft.Finetune(steps=3, seqlen=64, batch_size=2), calibration=ids,
                       engine=SequentialEngine(args.device, progress=False))
    finally:
        ft.functional_call = real
    want = {torch.device(args.device).type}
    assert seen and all(s == want for s in seen), seen
    last = rep.recovery[-1]
    return {"steps": len(seen), "loss_first": round(last["finetune_loss_first"], 4),
            "loss_last": round(last["finetune_loss_last"], 4)}


def check_obs_block_sweep(args) -> dict:
    """The fused Triton block sweep vs the torch column loop, a Llama-2-7B down_proj (4096 x 11008)
    GPTQ W4 g128: seconds each, codes agreeing (issue 14)."""
    _cuda(args)
    import compresslab.obs as obs

    torch.manual_seed(0)
    d, rows = 11008, 4096
    X = torch.randn(8192, d, device=args.device)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(rows, d, device=args.device) * 0.02
    spec = obs.GridSpec(4, 128, "asym")
    times, fused = {}, obs.fused_block_sweep
    try:
        for name in ("fused", "torch"):
            if name == "torch":
                obs.fused_block_sweep = lambda *a: None
            obs.obs_compress(W[:256], H[:1024, :1024], quant=spec)  # warm-up / compile
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            W_hat, qw, _ = obs.obs_compress(W, H, quant=spec)
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - t0, qw.encode(W_hat).codes)
    finally:
        obs.fused_block_sweep = fused
    same = (times["fused"][1] == times["torch"][1]).float().mean().item()
    assert same > 0.99, same
    return {"fused_s": round(times["fused"][0], 3), "torch_s": round(times["torch"][0], 3),
            "speedup": round(times["torch"][0] / times["fused"][0], 2), "codes_agree": round(same, 5)}


def check_plan_hidden_on_host(args) -> dict:
    """A max_memory that holds no more than the block and one chunk: the plan keeps hidden states on
    the host (pinned) and moves chunks; outputs equal the unconstrained run's (issue 15)."""
    _cuda(args)
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import TinyModel
    from compresslab.plan import Shape, estimate

    model, _ = TinyModel(num_layers=4, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4,
                         device="cpu", dtype="float32").load()
    ids = torch.randint(0, 256, (64, 512), generator=torch.Generator().manual_seed(0))

    class Observe:
        needs = frozenset({"hessian"})

        def check(self, name, layer):
            pass

        def compress(self, name, layer, stats):
            stats.hessian

    ref = SequentialEngine(args.device, max_memory=None, progress=False).run(model, ids, [Observe()],
                                                                             keep_outputs=True)
    n, t = ids.shape
    budget = estimate(Shape.of(model.config), n, t, 8, hidden_on_host=True) + 1
    _reset(args)
    eng = SequentialEngine(args.device, max_memory=budget, progress=False)
    out = eng.run(model, ids, [Observe()], keep_outputs=True)
    assert eng.plan.hidden_on_host and out["outputs"].device.type == "cpu", eng.plan
    err = ((out["outputs"] - ref["outputs"].cpu()).norm() / ref["outputs"].norm()).item()
    assert err < 1e-5, err
    return {"plan": eng.plan.describe(), "peak_device_gb": _peak(args) * 2**30 / 1e9, "outputs_rel_diff": err}


def check_packed_checkpoint(args) -> dict:
    """Save a compressed model as a packed checkpoint, load it on the device, and run it: the logits
    through PackedLinear match the in-memory compressed model's."""
    import tempfile

    from compresslab import compress
    from compresslab.checkpoint import load_compressed, save_compressed
    from compresslab.models.loaders import TinyModel
    from compresslab.pruner.magnitude import Magnitude
    from compresslab.quantizer.rtn import RTN

    model, tok = TinyModel("llama", hidden_size=256, intermediate_size=512, num_layers=2, device="cpu").load()
    compress(model, pruner=Magnitude(0.5, "2:4"), quantizer=RTN(bits=4, group_size=64))
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory() as d:
        man = save_compressed(model, d, tok)
        packed, _ = load_compressed(d, device=args.device, dtype=torch.float32)
        with torch.no_grad():
            got = packed(input_ids=ids.to(args.device)).logits.float().cpu()
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-3, err
    return {"avg_bits": round(man["compressed"]["avg_bits"], 3), "logits_rel_diff": err}


def check_kernels(args) -> dict:
    """experiments/bench/kernels.py: the int4 and 2:4+int4 Triton kernels, compiled, against fp16
    torch.matmul at Llama-3-8B shapes, batch 1/16/64 (targets: w4a16 >= 3x, 2:4+int4 >= 4.5x at batch 1)."""
    _cuda(args)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "kernels.py"), "--iters", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    return {"table": "experiments/results/kernels.md"}


DIST_CHILD = r"""
import json, os, sys, torch
from compresslab.engine import SequentialEngine
from compresslab.models.loaders import TinyModel
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ
torch.manual_seed(0)
model, _ = TinyModel("llama", hidden_size=512, intermediate_size=1024, num_layers=4, device="cpu").load()
ids = torch.randint(0, 256, (16, 256), generator=torch.Generator().manual_seed(1))
engine = SequentialEngine("cuda", progress=False, max_memory=None)
res = engine.run(model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=128)])
if engine.ranks.is_main:
    w = {k: v.float().cpu() for k, v in model.state_dict().items() if k.endswith("proj.weight")}
    torch.save(w, sys.argv[1])
    print(json.dumps({"world": engine.ranks.world, "device": str(engine.device), "s": res["time/compress_s"],
                      **res.get("ranks", {})}))
"""


def check_distributed(args) -> dict:
    """One compression on every GPU of the machine (torchrun, nccl, one rank per GPU) against one process:
    the same weights to float-summation order (issue 17). A machine with one GPU says so and skips."""
    import tempfile

    _cuda(args)
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(f"this machine has {gpus} GPU: the distributed case needs 2 or more (torchrun --nproc-per-node <GPUs>)")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "child.py"
        script.write_text(DIST_CHILD)
        runs = {}
        for name, cmd in (("one", [sys.executable, str(script)]),
                          ("many", [torchrun, "--nproc-per-node", str(min(gpus, 8)), str(script)])):
            proc = subprocess.run([*cmd, str(Path(d) / f"{name}.pt")], cwd=ROOT, capture_output=True, text=True,
                                  timeout=240)
            assert proc.returncode == 0, proc.stderr[-1500:]
            runs[name] = (json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(Path(d) / f"{name}.pt"))
    (one, w1), (many, wn) = runs["one"], runs["many"]
    worst = max(float((wn[k] - v).abs().max() / v.abs().max()) for k, v in w1.items())
    return {"ranks": many["world"], "one_rank_s": round(one["s"], 2), "ranks_s": round(many["s"], 2),
            "max_weight_diff_rel": worst, **{k: round(v, 3) for k, v in many.items() if k.startswith("dist/")}}


CHECKS = {
    "engine_shapes": check_engine_shapes,
    "beam_granularity2": check_beam_granularity2,
    "finetune": check_finetune,
    "obs_block_sweep": check_obs_block_sweep,
    "plan_hidden_on_host": check_plan_hidden_on_host,
    "packed_checkpoint": check_packed_checkpoint,
    "kernels": check_kernels,
    "distributed": check_distributed,
}


def run_checks(args) -> list[dict]:
    rows = []
    for name, fn in CHECKS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            row = {"check": name, "result": "ok", "detail": fn(args)}
        except Skip as e:
            row = {"check": name, "result": "skipped", "detail": str(e)}
        except Exception as e:  # noqa: BLE001 - every check reports, the next one runs
            traceback.print_exc()
            row = {"check": name, "result": "FAIL", "detail": f"{type(e).__name__}: {e}"[:400]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    return rows


def write_table(rows: list[dict], out: str | Path, meta: dict) -> Path:
    """gpu_check.json and gpu_check.md in `out`; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    lines = ["# GPU check", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| check | result | detail | seconds |", "|---|---|---|---|"]
    for r in rows:
        detail = r["detail"] if isinstance(r["detail"], str) else json.dumps(r["detail"], default=str)
        lines.append(f"| {r['check']} | {r['result']} | {detail.replace('|', '/')} | {r['seconds']} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return out / "gpu_check.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
            "torch": torch.__version__, "shape": args.shape, "layers": args.layers,
            "calibration": f"{args.nsamples}x{args.seqlen}", "dtype": str(args.dtype).removeprefix("torch.")}
    rows = run_checks(args)
    print(write_table(rows, args.out, meta).read_text())
    return 0 if all(r["result"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
