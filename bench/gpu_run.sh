#!/usr/bin/env bash
# One call on the GPU machine (bare, no registry): build the extension for sm_90, run the GPU tests,
# run the benchmarks; everything lands under $OUT (logs, JSON, CSV, PNG).
#   STAGES="build test bench" bash bench/gpu_run.sh
# One device call runs at most 10 minutes: split the suite over calls into one $OUT, each a part, e.g.
#   BENCH_ARGS="--sections llama7b,profile,buckets,cache,smollm,grpc --part a"  (~7 min)
#   BENCH_ARGS="--sections grpc_overhead,concurrency,open_loop --part b"       (~4 min; STAGES=bench)
# or a short run of the batch-1 figures and the many-callers sections in one call:
#   BENCH_SYSTEMS=hybrid BENCH_ARGS="--sections llama7b,concurrency,grpc_overhead,open_loop"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test bench"}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD:$PWD/server:$PWD/client:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Python packages the GPU image lacks travel as wheels in .whl/ (see the README's Benchmarks section)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch,transformers,grpc;print("torch",torch.__version__,"cuda",torch.version.cuda,"transformers",transformers.__version__,"grpc",grpc.__version__)'; git rev-parse HEAD 2>/dev/null; } | tee "$OUT/env.txt"
rc=0
if [[ " $STAGES " == *" build "* ]]; then
  start=$(date +%s)
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
if [[ " $STAGES " == *" test "* ]]; then
  python3 -m pytest -q -x -m gpu -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [[ " $STAGES " == *" bench "* ]]; then
  python3 -m bench run --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | tail -60  # -a: the calls of a split run in one log
  rc=$(( rc | PIPESTATUS[0] ))
fi
# PACK=1: everything under $OUT in one archive (a device that returns a few files returns it whole)
if [[ -n "${PACK:-}" ]]; then
  tar -czf /tmp/hjcg-results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/hjcg-results.tgz "$OUT/results.tgz"
fi
exit $rc
