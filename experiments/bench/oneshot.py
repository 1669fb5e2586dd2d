"""One-shot pruning/quantization table on SmolLM2-135M (issue 4's protocol).

    python experiments/bench/oneshot.py [--only NAME ...] [--nsamples 128 --calib-seqlen 512 --windows 16]

Calibration 128×512 from wikitext2 (valid split), eval wikitext2 seqlen 2048, first 16 windows.
Each method runs as its own `run.py` process (so peak RSS is per method); results are read back
from each run's metrics.json. SmolLM2 widths (576, 1536) are multiples of 64, not 128: g64.
"""

from pathlib import Path

from _common import emit, run_table, table_args, table_overrides
G = "quantizer.group_size=64"
METHODS = {
    "dense": [],
    "magnitude 2:4": ["pruner=magnitude", "pruner.pattern=2:4"],
    "wanda 2:4": ["pruner=wanda", "pruner.pattern=2:4"],
    "sparsegpt 2:4": ["pruner=sparsegpt", "pruner.pattern=2:4"],
    "rtn W4 g64": ["quantizer=rtn", "quantizer.bits=4", G],
    "gptq W4 g64": ["quantizer=gptq", "quantizer.bits=4", G],
    "gptq W4 g64 act_order": ["quantizer=gptq", "quantizer.bits=4", G, "quantizer.act_order=true"],
    "rtn W3 g64": ["quantizer=rtn", "quantizer.bits=3", G],
    "gptq W3 g64": ["quantizer=gptq", "quantizer.bits=3", G],
    "slim_quant W4 per-tensor": ["quantizer=slim_quant", "quantizer.bits=4"],
    "slim_quant W4 g64": ["quantizer=slim_quant", "quantizer.bits=4", G],
    "absmax W4 per-tensor": ["quantizer=rtn", "quantizer.bits=4", "quantizer.grid=absmax", "quantizer.granularity=tensor"],
    "absmax W4 g64": ["quantizer=absmax", "quantizer.bits=4", G],
    "awq+rtn W4 g64": ["quantizer=awq", "quantizer.bits=4", G],
    "sparsegpt 2:4 + gptq W4 g64": ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=gptq", "quantizer.bits=4", G],
    # the same two methods in two passes: SparseGPT, then GPTQ holding its mask (pruner.joint=false)
    "sparsegpt 2:4 + gptq W4 g64 (two passes)": ["pruner=sparsegpt", "pruner.pattern=2:4", "pruner.joint=false",
                                                 "quantizer=gptq", "quantizer.bits=4", G],
    "sparsegpt 2:4 + rtn W4 g64": ["pruner=sparsegpt", "pruner.pattern=2:4", "quantizer=rtn", "quantizer.bits=4", G],
    "wanda 2:4 + slim_quant W4": ["pruner=wanda", "pruner.pattern=2:4", "quantizer=slim_quant", "quantizer.bits=4"],
}


def main():
    args = table_args("oneshot").parse_args()
    common = table_overrides(args)
    rows = run_table("oneshot", METHODS, common, Path(args.out), args.only, args.collect)
    emit("oneshot", rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "calibration": f"wikitext2 valid, {args.nsamples}x{args.calib_seqlen}",
        "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "fp32_model_gb": round(134.5e6 * 4 / 2**30, 3),
        "calibration_activations_gb": round(args.nsamples * args.calib_seqlen * 576 * 4 / 2**30, 3),
        "sparsity": "pruned fraction (the pruners' masks); rows measured before 2026-11-30 counted exact zeros "
                    "(so quantize-only rows showed ~0.13 and pruned rows ~0.505)",
        "grids": "slim_quant and absmax: the SLiM seed's AbsMax grid (levels ±(2^(b-1)-1)) since 2026-11-30",
    }, merge=bool(args.only))


if __name__ == "__main__":
    main()
