#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install onnxprune with onnxruntime-gpu in a fresh venv, run the engine
# tests, and compare statistics and evaluation on CUDA against the CPU -> docs/results/gpu.md (+ .json).
#   bash scripts/gpu_check.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-gpu}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e '.[gpu,test]'
"$VENV/bin/python" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_engines.py
"$VENV/bin/python" scripts/gpu_compare.py --out docs/results/gpu.md --json docs/results/gpu.json --force
