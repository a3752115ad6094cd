#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU, torch, pytest and no network
# (README: "Checking on a GPU"). Run `bash scripts/prepare_gpu.sh` first where there is a network, and
# bring its .gpu/ folder along. Run from anywhere; logs and numbers go to $OUT (default runs/gpu).
# About 3-5 minutes on one H100; each step has its own time limit so that the next still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/whl ] && [ -d .gpu/cache ] || { echo "no .gpu/ here: run scripts/prepare_gpu.sh first" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loop_site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/loop_site LOOP_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # bench G3 fills and frees most of the memory repeatedly
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}  # one machine, maybe no network interface but lo
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q test_loop.py -k cuda -p no:cacheprovider -rfEs --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests=$?
timeout 260 python3 bench.py --gpu --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log"
bench=$?
echo "gpu_check: tests exit $tests, bench exit $bench; logs in $OUT"
exit $(( tests || bench ))
