#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one H100/H200-class GPU): the full-size benchmarks.
#   1. adapter generation latency + peak memory, Gemma-2-2b shape, official D2L hypernetwork
#      (315M params, random weights), 256..32K-token documents, batched vs iterative, bf16;
#      T2L adapters for 64 descriptions.
#   2. meta-training step time, tokens/s, FLOP/s fraction of peak: D2L official on Gemma-2-2b
#      (4096-token context + 1024-token QA pack, as the official packed sizes) and T2L SFT.
# Each benchmark prints the measured matmul peak first and writes JSON + markdown to $OUT.
# Usage: OUT=/tmp/gpu_results PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
  echo "gpu_check: JAX sees no accelerator (backend cpu); install jax[cuda12] first" >&2
  exit 3
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

timeout 270 $PY -m benchmarks.adapter_latency --base gemma2_2b --hypernet official \
  --lengths 256,1024,4096,16384,32768 --modes batched,iterative --dtype bfloat16 --repeats 3 \
  --out "$OUT"
echo "adapter_latency rc=$? after $(( $(date +%s) - start )) s"

timeout 180 $PY -m benchmarks.train_throughput --base gemma2_2b --d2l-hypernet official \
  --ctx-len 4096 --prompt-len 256 --resp-len 768 --t2l-batch 8 --t2l-len 128 \
  --dtype bfloat16 --repeats 5 --out "$OUT"
echo "train_throughput rc=$? after $(( $(date +%s) - start )) s"

timeout 60 $PY -m benchmarks.query_cost --base gemma2_2b --hypernet official \
  --lengths 1024,4096,16384 --dtype bfloat16 --repeats 3 --out "$OUT"
echo "query_cost rc=$? after $(( $(date +%s) - start )) s"
ls -la "$OUT"
