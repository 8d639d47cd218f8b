"""Tiny MLPs in the layer patterns exporters produce, with a numpy forward pass as the reference."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ACTIVATIONS = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0)}


def mlp(sizes=(5, 4, 3), pattern="gemm_t", seed=0, softmax=False, bias=True, alpha=1.0, beta=1.0,
        activation="tanh", opset=17, ir=8):
    """A model and its numpy reference ``forward(x) -> (logits, [(z, a) per layer])``.

    pattern: gemm_t (Gemm transB=1), gemm (transB=0), matmul (MatMul then Add(h, b)), matmul_left
    (Add(b, h)). Weights are returned in the (out, in) view as ``params``.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, params = [], [], []
    h = "x"
    for li, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
        b = rng.normal(size=o).astype(np.float32) * 0.5
        params.append((w, b if bias else np.zeros(o, np.float32)))
        a = f"a{li}"
        if pattern.startswith("gemm"):
            stored = w if pattern == "gemm_t" else w.T.copy()
            inputs = [h, f"W{li}"] + ([f"b{li}"] if bias else [])
            nodes.append(helper.make_node("Gemm", inputs, [a], name=f"fc{li}", transB=int(pattern == "gemm_t"),
                                          alpha=alpha, beta=beta))
            inits.append(numpy_helper.from_array((stored / alpha).astype(np.float32), f"W{li}"))
            if bias:
                inits.append(numpy_helper.from_array((b / beta).astype(np.float32), f"b{li}"))
        else:
            inits.append(numpy_helper.from_array(w.T.copy(), f"W{li}"))
            mm = f"mm{li}" if bias else a
            nodes.append(helper.make_node("MatMul", [h, f"W{li}"], [mm], name=f"fc{li}"))
            if bias:
                inits.append(numpy_helper.from_array(b, f"b{li}"))
                pair = [f"b{li}", mm] if pattern == "matmul_left" else [mm, f"b{li}"]
                nodes.append(helper.make_node("Add", pair, [a], name=f"bias{li}"))
        if li < len(sizes) - 2:
            op = {"tanh": "Tanh", "relu": "Relu"}[activation]
            nodes.append(helper.make_node(op, [a], [f"h{li}"], name=f"act{li}"))
            h = f"h{li}"
    out = a
    if softmax:
        nodes.append(helper.make_node("Softmax", [a], ["probs"], name="softmax", axis=-1))
        out = "probs"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    act = ACTIVATIONS[activation]

    def forward(x, weights=None):
        weights = weights or params
        z, trace = np.asarray(x, np.float64), []
        for li, (w, b) in enumerate(weights):
            a = z @ np.asarray(w, np.float64).T + b
            trace.append((z, a))
            z = act(a) if li < len(weights) - 1 else a
        return z, trace

    return model, params, forward


def data(n=64, d=5, seed=1, classes=3):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, d)).astype(np.float32), "y": rng.integers(0, classes, n)}
