"""onnxprune: elimination-compensation pruning of ONNX models, validated on onnxruntime.

    result = onnxprune.prune("model.onnx", "calib.npz", sparsity=0.8)       # method="ecp"
    onnxprune.save_model(result.model, "pruned.onnx")
    onnxprune.evaluate("pruned.onnx", "test.npz", reference="model.onnx")
"""
from .errors import CheckFailed, InputError, OnnxPruneError, loading

with loading():  # under the onnxprune command: SIGTERM handled, and a Ctrl-C while numpy/onnx load is one line
    from .api import Pruner, PruneResult, evaluate, inspect, prune, prune_structured
    from .finetune import finetune
    from .modelio import load_model, save_model
    from .saliency import METHODS
    from .sensitivity import sensitivity

__all__ = ["prune", "Pruner", "evaluate", "inspect", "PruneResult", "load_model", "save_model", "METHODS",
           "InputError", "CheckFailed", "OnnxPruneError", "finetune", "sensitivity",
           "prune_structured"]
__version__ = "0.1.0"
