"""Kernel latency vs torch fp16 (issue 8's shapes), GPU only; without a GPU the rows say "not measured".

    python experiments/bench/kernels.py [--iters 100]

Shapes (N×K): 4096×4096, 4096×11008, 11008×4096, 14336×4096; batch 1, 16, 64. Ratios are fp16
latency / kernel latency, measured in one process. Anchors: Marlin ≈3.9× over fp16 at batch ≤ 16,
Sparse-Marlin ≈5.3×; the int4 bandwidth limit is ≈4× (2:4+int4 ≈5.3×).
"""

import argparse

import torch

from _common import emit

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (14336, 4096)]
BATCHES = [1, 16, 64]


def _time(fn, iters):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # µs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    rows = []
    gpu = torch.cuda.is_available()
    for N, K in SHAPES:
        for M in BATCHES:
            row = {"N": N, "K": K, "batch": M}
            if not gpu:
                row.update({"fp16_us": "not measured", "w4a16_us": "not measured", "sparse24_w4_us": "not measured",
                            "lut4_us": "not measured", "note": "no GPU on this machine"})
                rows.append(row)
                continue
            from compresslab.checkpoint.pack import compact_nm, pack_bits
            from compresslab.kernels import lut4_triton, sparse24_w4_triton, w4a16_triton

            dev, g = "cuda", 128
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            W = torch.randn(N, K, device=dev, dtype=torch.float16)
            codes = torch.randint(0, 16, (N, K), device=dev)
            qw = pack_bits(codes.reshape(-1), 4).reshape(N, K // 8)
            scales = torch.rand(N, K // g, device=dev, dtype=torch.float16) * 0.01
            zeros = torch.full((N, K // g), 8.0, device=dev, dtype=torch.float16)
            keep = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=dev)
            keep[..., :2] = True
            _, pos = compact_nm(keep.reshape(N, K), 2, 4)
            qk = pack_bits(codes[:, : K // 2].reshape(-1), 4).reshape(N, K // 16)
            meta = pack_bits(pos.reshape(-1), 2).reshape(N, K // 32)
            t16 = _time(lambda: x @ W.T, args.iters)
            t4 = _time(lambda: w4a16_triton(x, qw, scales, zeros, g), args.iters)
            t24 = _time(lambda: sparse24_w4_triton(x, qk, meta, scales, zeros, g), args.iters)
            lut = torch.randn(N, 16, device=dev).sort(1).values.half()  # SqueezeLLM's per-row tables
            tl4 = _time(lambda: lut4_triton(x, qw, lut), args.iters)
            row.update({"fp16_us": t16, "w4a16_us": t4, "sparse24_w4_us": t24, "lut4_us": tl4,
                        "w4a16_speedup": t16 / t4, "sparse24_w4_speedup": t16 / t24, "lut4_speedup": t16 / tl4})
            rows.append(row)
            print(row, flush=True)
    emit("kernels", rows, {"device": torch.cuda.get_device_name() if gpu else "CPU only: GPU rows not measured",
                           "targets": "batch 1, 4096x11008 class: w4a16 >= 3x, 2:4+w4 >= 4.5x over fp16"})


if __name__ == "__main__":
    main()
