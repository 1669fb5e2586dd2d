"""Where the one-pass memory goes: RSS through one SmolLM2-shaped block (random init), module by module.

    python experiments/bench/block_memory.py [--nsamples 128 --seqlen 512]

One block (hidden 576, MLP 1536, GQA 9/3) compressed by the engine's one pass with sparsegpt 2:4 +
gptq W4 g64 on random-token calibration, in a fresh process per variant: the family's own MLP, and
the adapter's lean MLP. A thread samples the RSS every 2 ms and files it under the module running at
that moment (forward pre/post hooks on every submodule but `up_proj`, whose hooks would switch the lean
MLP's row slicing off); each row is that module's peak above the RSS before the engine ran, beside the
plan's estimate for the whole block. Writes experiments/results/block_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import emit

CHILD = r"""
import json, sys, threading, time
import psutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
from compresslab.engine import SequentialEngine
from compresslab.models import adapters
from compresslab.plan import Shape, estimate
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.gptq import GPTQ

a = json.loads(sys.argv[1])
torch.manual_seed(0)
if not a["lean"]:  # the family's own MLP
    object.__setattr__(adapters._LLAMA, "gated_mlp", None)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  num_hidden_layers=1, vocab_size=49152, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
proc = psutil.Process()
base = proc.memory_info().rss
where, peaks, stop = ["capture"], {}, [False]

def sample():
    while not stop[0]:
        v = proc.memory_info().rss - base
        peaks[where[0]] = max(peaks.get(where[0], 0), v)
        time.sleep(0.002)

for name, mod in model.model.layers[0].named_modules():
    if name.endswith("up_proj"):
        continue
    label = name or "block"
    mod.register_forward_pre_hook(lambda m, x, n=label: where.__setitem__(0, "in " + n))
    mod.register_forward_hook(lambda m, x, y, n=label: where.__setitem__(0, "after " + n))
th = threading.Thread(target=sample)
th.start()
ids = torch.randint(0, 49152, (a["n"], a["t"]))
try:
    SequentialEngine("cpu", max_memory=None, progress=False).run(model, ids, [SparseGPT(0.5, "2:4"), GPTQ(4, 64)])
finally:
    stop[0] = True
    th.join()
est = estimate(Shape.of(cfg), a["n"], a["t"], None, mlp_copies=1 if a["lean"] else 3)
print(json.dumps({"peaks": peaks, "plan_gb": est / 1e9}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    res = {}
    for lean in (False, True):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"lean": lean, "n": args.nsamples,
                                                                      "t": args.seqlen})],
                             capture_output=True, text=True, check=True)
        res[lean] = json.loads(out.stdout.strip().splitlines()[-1])
    phases = list(dict.fromkeys([*res[False]["peaks"], *res[True]["peaks"]]))
    rows = [{"phase": p, "family MLP (GiB)": res[False]["peaks"].get(p, 0) / 2**30,
             "lean MLP (GiB)": res[True]["peaks"].get(p, 0) / 2**30} for p in phases]
    rows.append({"phase": "PEAK", "family MLP (GiB)": max(r["family MLP (GiB)"] for r in rows),
                 "lean MLP (GiB)": max(r["lean MLP (GiB)"] for r in rows)})
    rows.append({"phase": "plan estimate (GB, 10^9 B)", "family MLP (GiB)": res[False]["plan_gb"],
                 "lean MLP (GiB)": res[True]["plan_gb"]})
    gib = args.nsamples * args.seqlen * 576 * 4 / 2**30
    emit("block_memory", rows, {
        "block": "one random-init SmolLM2-shaped Llama block (576 / 1536 / GQA 9:3), fp32, CPU",
        "stages": "sparsegpt 2:4 + gptq W4 g64, the engine's one pass",
        "calibration": f"random tokens {args.nsamples}x{args.seqlen}: one (tokens, 576) tensor is {gib:.3f} GiB, "
                       f"one (tokens, 1536) tensor {gib * 1536 / 576:.3f} GiB",
        "method": "RSS above the RSS before the engine, sampled every 2 ms, filed under the module running",
    })


if __name__ == "__main__":
    main()
