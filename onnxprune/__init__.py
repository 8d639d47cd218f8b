"""onnxprune: elimination-compensation pruning of ONNX models, validated on onnxruntime.

    result = onnxprune.prune("model.onnx", "calib.npz", sparsity=0.8)       # method="ecp"
    onnxprune.save_model(result.model, "pruned.onnx")
    onnxprune.evaluate("pruned.onnx", "test.npz", reference="model.onnx")
"""
from onnxprune.errors import CheckFailed, InputError, OnnxPruneError, loading

with loading():  # under the onnxprune command: SIGTERM handled, and a Ctrl-C while numpy/onnx load is one line
    from onnxprune.api import evaluate, inspect, prune, prune_structured
    from onnxprune.io.models import load_model, save_model
    from onnxprune.pipeline import Pruner, PruneResult
    from onnxprune.repair.finetune import finetune
    from onnxprune.score.weights import METHODS
    from onnxprune.sweep import sensitivity

__all__ = ["prune", "Pruner", "evaluate", "inspect", "PruneResult", "load_model", "save_model", "METHODS",
           "InputError", "CheckFailed", "OnnxPruneError", "finetune", "sensitivity",
           "prune_structured"]
__version__ = "0.1.0"
