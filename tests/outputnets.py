"""Models whose outputs are on several scales or have their batch elsewhere, for the relative objective."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def detector(seed=0, inputs=8, hidden=16, boxes=4, classes=6):
    """A detector-like model: a shared trunk, a box head in pixels (x 100) and a class head of sigmoid
    scores near 1e-3, concatenated into one output (N, boxes + classes)."""
    rng = np.random.default_rng(seed)

    def weights(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)

    inits = [numpy_helper.from_array(weights(hidden, inputs), "W0"), numpy_helper.from_array(np.zeros(hidden, np.float32), "b0"),
             numpy_helper.from_array(weights(boxes, hidden), "W1"), numpy_helper.from_array(np.zeros(boxes, np.float32), "b1"),
             numpy_helper.from_array(weights(classes, hidden), "W2"),
             numpy_helper.from_array(np.full(classes, -7.0, np.float32), "b2"),
             numpy_helper.from_array(np.array(100.0, np.float32), "pixels")]
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["a0"], name="trunk", transB=1),
             helper.make_node("Tanh", ["a0"], ["h0"], name="act"),
             helper.make_node("Gemm", ["h0", "W1", "b1"], ["a1"], name="box_head", transB=1),
             helper.make_node("Mul", ["a1", "pixels"], ["box"], name="to_pixels"),
             helper.make_node("Gemm", ["h0", "W2", "b2"], ["a2"], name="class_head", transB=1),
             helper.make_node("Sigmoid", ["a2"], ["scores"], name="scores"),
             helper.make_node("Concat", ["box", "scores"], ["y"], name="concat", axis=1)]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", boxes + classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sequence_first(seed=0, inputs=6, steps=5, hidden=12, classes=7):
    """A CTC-like model: x (N, steps * inputs) -> per step a shared MLP -> y (steps, N, classes), the
    batch on axis 1 as a sequence-first export has it."""
    rng = np.random.default_rng(seed)

    def weights(i, o):
        return (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32)

    inits = [numpy_helper.from_array(np.array([0, steps, inputs], np.int64), "shape"),
             numpy_helper.from_array(weights(inputs, hidden), "W0"), numpy_helper.from_array(np.zeros(hidden, np.float32), "b0"),
             numpy_helper.from_array(weights(hidden, classes), "W1"),
             numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "b1")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["seq"], name="to_steps"),
             helper.make_node("MatMul", ["seq", "W0"], ["m0"], name="fc0"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0_bias"),
             helper.make_node("Relu", ["a0"], ["h0"], name="act"),
             helper.make_node("MatMul", ["h0", "W1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Transpose", ["a1"], ["y"], name="time_first", perm=[1, 0, 2])]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps * inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, "N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
