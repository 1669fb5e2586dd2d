"""SliM-LLM table on SmolLM2-135M (issue 5's protocol): GPTQ vs SliM-LLM (and its parts) vs SliM-LLM+.

    python experiments/bench/slim_llm.py [--bits 2 3] [--only NAME ...]

Calibration 128×512 wikitext2, eval wikitext2 seqlen 2048, first 16 windows, group size 64.
"""

import argparse
from pathlib import Path

from _common import ROOT, emit, run_table


def methods(bits: int) -> dict[str, list[str]]:
    q = [f"quantizer.bits={bits}", "quantizer.group_size=64"]
    return {
        f"gptq W{bits}": ["quantizer=gptq", *q],
        f"slim_llm W{bits}": ["quantizer=slim_llm", *q],
        f"slim_llm W{bits} SBA only": ["quantizer=slim_llm", *q, "quantizer.sqc=false"],
        f"slim_llm W{bits} SQC only": ["quantizer=slim_llm", *q, "quantizer.sba=false"],
        f"slim_llm_plus W{bits}": ["quantizer=slim_llm_plus", *q],
        # OmniQuant's protocol at a tenth of its epochs (20 x 128 samples take hours on 2 cores)
        f"slim_llm_plus W{bits} (2 epochs)": ["quantizer=slim_llm_plus", *q, "quantizer.epochs=2"],
        # not in the papers: LWC starts from SliM-LLM's GPTQ solution, a block keeps its start when
        # training raised its loss (lwc_probe_w3_e2.md: RTN's start loses to GPTQ's at W3 on this model)
        f"slim_llm_plus W{bits} (init=gptq, keep_better, 2 epochs)": [
            "quantizer=slim_llm_plus", *q, "quantizer.epochs=2", "quantizer.init=gptq", "quantizer.keep_better=true"],
        # the same on 32 of the 128 calibration samples (a quarter of the training: ~1 h on 2 shared cores)
        f"slim_llm_plus W{bits} (init=gptq, keep_better, 2 epochs x 32 samples)": [
            "quantizer=slim_llm_plus", *q, "quantizer.epochs=2", "quantizer.init=gptq", "quantizer.keep_better=true",
            "quantizer.nsamples=32"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_slim_llm"))
    args = ap.parse_args()
    common = ["data.nsamples=128", "data.seqlen=512", "eval.seqlen=2048", f"eval.max_windows={args.windows}",
              "logger=none", "engine.progress=false", "eval.progress=false"]
    table = {k: v for b in args.bits for k, v in methods(b).items()}
    rows = run_table("slim_llm", table, common, Path(args.out), args.only)
    emit("slim_llm", rows, {
        "model": "SmolLM2-135M-Instruct (dense weights dequantized from GGUF Q4_1), fp32, CPU",
        "calibration": "wikitext2 valid, 128x512", "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows",
        "group_size": 64, "dense_ppl_16_windows": 20.43,
    }, merge=bool(args.only))


if __name__ == "__main__":
    main()
