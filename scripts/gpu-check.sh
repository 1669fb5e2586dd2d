#!/usr/bin/env bash
# The one prepared check of compresslab's CUDA paths, for a machine with a GPU (the device tool lends an
# H200 to some sessions: 15 minutes in all, no network, only the working tree carried). Run it ONCE:
#
#   scripts/gpu-check.sh            # writes gpu_check.{json,md} to $OUT when set, else experiments/results/gpu/
#
# It needs python3 with torch (CUDA), transformers and triton (the device image has them); compresslab
# itself is used from this checkout (no install: src/ plus kernels/ as compresslab.kernels). The checks
# live in scripts/gpu_check.py (each a row of the table; a failing check prints its error and the next
# one runs; its CPU dry run is tests/test_gpu_check.py):
#   engine_shapes        the engine on cuda in bf16, a random Llama-3-8B-shaped model cut to 4 blocks,
#                        GPTQ W4 g128 and sparsegpt 2:4 + gptq W4 g128 at 128x2048: s/block, peak GPU
#                        memory, extrapolated to 32 blocks (issue 15)
#   beam_granularity2    BEAM with block_granularity=2, model home on the CPU: every parameter a training
#                        step touches is on cuda (issue 13)
#   finetune             recovery=finetune with engine.device=cuda on a model left on the CPU (issue 13)
#   obs_block_sweep      the fused Triton block sweep vs the torch column loop, 4096 x 11008 GPTQ W4 g128 (issue 14)
#   plan_hidden_on_host  a max_memory that holds only the block and one chunk: hidden states on the host (issue 15)
#   packed_checkpoint    save, load on cuda, forward through PackedLinear (issue 15)
#   kernels              experiments/bench/kernels.py: int4, 2:4+int4 and LUT (SqueezeLLM) kernels vs fp16 (issues 8, 20)
#   distributed          one compression on every GPU (torchrun, nccl) vs one process, same weights to float
#                        order (issue 17); a machine with one GPU (the lent H200) reports "skipped" and why
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIB=$(mktemp -d)
cp -r src/compresslab "$LIB/compresslab"
cp -r kernels "$LIB/compresslab/kernels"
export PYTHONPATH="$LIB:src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUTDIR=${OUT:-experiments/results/gpu}
timeout 480 "$PY" scripts/gpu_check.py --out "$OUTDIR" "$@"
rc=$?
cp experiments/results/kernels.md experiments/results/kernels.json "$OUTDIR/" 2>/dev/null || true
rm -rf "$LIB"
exit $rc
