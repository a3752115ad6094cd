#!/usr/bin/env bash
# Prepare a check on a GPU machine that has torch but no network (README: "Checking on a GPU").
# Writes into .gpu/ (git-ignored), ~17 MB:
#   .gpu/cache/SmolLM2-135M-Instruct/  SmolLM2's tokenizer: the tests and bench.py take their token ids
#                                      from it (LOOP_CACHE points mini_world/smollm2.py there; no GGUF file needed)
#   .gpu/whl/                          the transformers wheel that requirements.txt pins (pure Python)
# scripts/gpu_check.sh then runs the CUDA tests and bench.py --gpu there in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu/whl .gpu/cache
python - <<'PY'
import model
from mini_world import smollm2

_, tokenizer = model.load(tiny=True, device="cpu")
tokenizer.save_pretrained(f".gpu/cache/{smollm2.CACHE.name}")
PY
version=$(sed -n 's/^transformers==//p' requirements.txt)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu/whl "transformers==$version"
du -sh .gpu
echo "Ready. On the GPU machine, with .gpu/ beside the working tree, run from the repository root:"
echo "    bash scripts/gpu_check.sh"
