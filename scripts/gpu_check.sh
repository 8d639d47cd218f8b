#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install onnxprune with onnxruntime-gpu in a fresh venv, run the engine
# tests, and compare statistics and evaluation on CUDA against the CPU -> docs/results/gpu.md (+ .json);
# then the sharded path on CUDA: its tests (a local Ray head included) and a prune whose statistics
# run on 1 and on 2 CUDA worker processes, which must write the same bytes.
#   bash scripts/gpu_check.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-gpu}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e '.[gpu,test,ray]'
"$VENV/bin/python" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_engines.py
"$VENV/bin/python" scripts/gpu_compare.py --out docs/results/gpu.md --json docs/results/gpu.json --force
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_shards.py
SHARDS="$(mktemp -d)"
trap 'rm -rf "$SHARDS"' EXIT
for workers in 1 2; do
  "$VENV/bin/onnxprune" prune models/mnist_cnn.onnx "$SHARDS/cuda-$workers.onnx" --data models/mnist_calib.npz \
    --sparsity 0.5 --probes 4 --seed 1 --provider cuda --workers "$workers" -v
done
cmp "$SHARDS/cuda-1.onnx" "$SHARDS/cuda-2.onnx" && echo "sharded statistics on CUDA: 1 and 2 workers wrote the same model"
