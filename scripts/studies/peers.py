"""onnxsim 0.8.1, the peer the studies compare with, run in its own interpreter (it is not a dependency)."""
from __future__ import annotations

import os
from pathlib import Path

ONNXSIM_PYTHON = Path(os.environ.get("ONNXSIM_PYTHON", "onnxsim-venv/bin/python"))  # its venv's python

# python -c ONNXSIM_PRUNE MODEL CALIB.npz OUT {sparsegpt|wanda} FRACTION: onnxsim's pruning with every
# calibration sample as a batch of one
ONNXSIM_PRUNE = """
import sys, numpy as np, onnx
from onnxsim import pruning
model, calib, out, kind, fraction = sys.argv[1:6]
d = dict(np.load(calib))
n = len(next(iter(d.values())))
batches = [{k: v[i:i + 1] for k, v in d.items()} for i in range(n)]
apply = pruning.apply_sparsegpt_pruning if kind == "sparsegpt" else pruning.apply_wanda_pruning
onnx.save(apply(onnx.load(model), calibration_data=batches, num_samples=n, sparsity=float(fraction)), out)
"""
