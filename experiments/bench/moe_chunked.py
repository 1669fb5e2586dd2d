"""The chunked path on Mixture-of-Experts blocks: experts observed a wave at a time vs one group at a time.

    python experiments/bench/moe_chunked.py [--hidden 256 --layers 4 --samples 16 --seqlen 256 --chunk 4]

When the memory plan chunks the calibration, every Linear group gets a statistics pass over the chunks
up to it. An MoE block has 2E expert groups; the experts' gate/up groups do not depend on each other's
compression, nor do their down groups, so the engine observes each of these waves in one pass
(adapter.group_waves), after one routing pass that counts every expert's tokens. Here: sparsegpt 2:4 +
gptq W4 g64 on the MoE families of families.py (8 experts, top-2), in one pass, in chunks with waves,
and in chunks without waves (`Adapter.group_waves` patched to one group per wave: the path before waves,
each pass stopped at its group's first Linear, no routing pass). Best of --repeats each, same process, fp32, CPU.
Writes experiments/results/moe_chunked.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import emit, parse_or_run_child, run_child


def child(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from compresslab.engine import SequentialEngine
    from compresslab.models import as_linears
    from compresslab.models.adapters import Adapter
    from compresslab.models.loaders import TinyModel
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ
    from families import _config

    h, family = spec["hidden"], spec["family"]
    loader = TinyModel(family, hidden_size=h, intermediate_size=3 * h, num_layers=spec["layers"], num_heads=8,
                       num_kv_heads=2, dtype="float32", device="cpu")
    cfg = _config(loader, family, h)
    ids = torch.randint(0, 256, (spec["samples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0))
    out, waves = {}, Adapter.group_waves
    for how, chunk in (("one_pass", None), ("waves", spec["chunk"]), ("per_group", spec["chunk"])):
        best = float("inf")
        for _ in range(spec["repeats"]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            as_linears(model)
            engine = SequentialEngine("cpu", chunk_size=chunk, max_memory=None, progress=False)
            if how == "per_group":  # no waves: each group its own pass, stopped at its first Linear
                Adapter.group_waves = lambda self, block: [[k] for k in range(len(self._present(block)))]
            try:
                t0 = time.perf_counter()
                engine.run(model, ids, [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=64)])
                best = min(best, time.perf_counter() - t0)
            finally:
                Adapter.group_waves = waves
        out[f"{how}_s"] = round(best, 3)
    out["waves_vs_per_group"] = round(out["waves_s"] / out["per_group_s"], 3)
    out["waves_vs_one_pass"] = round(out["waves_s"] / out["one_pass_s"], 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--families", nargs="+", default=["mixtral", "qwen3_moe", "deepseek_v3"])
    args = parse_or_run_child(ap, child)
    rows = []
    for family in args.families:
        spec = {k: getattr(args, k) for k in ("hidden", "layers", "samples", "seqlen", "chunk", "repeats")}
        rows.append(run_child(__file__, {**spec, "family": family}, family))
        print(json.dumps(rows[-1]), flush=True)
    emit("moe_chunked", rows, {
        "model": f"random-init, hidden {args.hidden}, 8 experts of intermediate {3 * args.hidden}, top-2, "
                 f"{args.layers} layers, fp32, CPU (torch threads: default)",
        "method": "sparsegpt 2:4 + gptq W4 g64 (joint pass)",
        "calibration": f"random tokens, {args.samples}x{args.seqlen}; chunks of {args.chunk} samples",
        "times": f"best of {args.repeats}; per_group: no waves, each group its own statistics pass stopped at its "
                 "first Linear (the path before waves)",
    })


if __name__ == "__main__":
    main()
