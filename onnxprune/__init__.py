"""onnxprune: elimination-compensation pruning of ONNX models, validated on onnxruntime."""
