"""Tiny Conv and sequence networks in the patterns exporters produce, built with onnx.helper."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def cnn(channels=2, size=6, spatial=2, groups=1, stride=1, dilation=1, pads=1, auto_pad=None, bias="input",
        batchnorm=False, activation="Tanh", classes=3, seed=0, opset=17, ir=8, width=4, pool=False):
    """x (N, channels, size[, size]) -> Conv(width, 3^spatial kernel) -> [BN] -> act -> [MaxPool] ->
    Conv(3, 2^spatial, stride 2) -> act -> Flatten -> Gemm(classes) -> logits.

    bias: "input" (Conv's B), "add" (a separate Add of a (1, C, 1, 1) constant), "none".
    """
    rng = np.random.default_rng(seed)
    k1, k2 = (3,) * spatial, (2,) * spatial
    w1 = rng.normal(size=(width, channels // groups) + k1) / np.sqrt(channels * 9)
    w2 = rng.normal(size=(3, width) + k2) / np.sqrt(width * 4)
    inits = [_init("conv1.weight", w1), _init("conv2.weight", w2), _init("conv2.bias", rng.normal(size=3) * 0.1)]
    attrs = dict(strides=[stride] * spatial, dilations=[dilation] * spatial, group=groups)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [pads] * (2 * spatial)
    nodes = []
    b1 = rng.normal(size=width) * 0.3
    if bias == "input":
        inits.append(_init("conv1.bias", b1))
        nodes.append(helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", **attrs))
    else:
        out = "c1" if bias == "none" else "c1raw"
        nodes.append(helper.make_node("Conv", ["x", "conv1.weight"], [out], name="conv1", **attrs))
        if bias == "add":
            inits.append(_init("conv1.add_bias", b1.reshape((1, width) + (1,) * spatial)))
            nodes.append(helper.make_node("Add", ["c1raw", "conv1.add_bias"], ["c1"], name="conv1_bias"))
    h = "c1"
    if batchnorm:
        inits += [_init("bn.scale", rng.uniform(0.5, 2, width)), _init("bn.bias", rng.normal(size=width) * 0.2),
                  _init("bn.mean", rng.normal(size=width) * 0.1), _init("bn.var", rng.uniform(0.5, 2, width))]
        nodes.append(helper.make_node("BatchNormalization", [h, "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"],
                                      name="bn", epsilon=1e-5))
        h = "bn"
    if activation:
        nodes.append(helper.make_node(activation, [h], ["h1"], name="act1"))
        h = "h1"
    if pool:
        nodes.append(helper.make_node("MaxPool", [h], ["p1"], name="pool1", kernel_shape=[2] * spatial, strides=[1] * spatial))
        h = "p1"
    nodes.append(helper.make_node("Conv", [h, "conv2.weight", "conv2.bias"], ["c2"], name="conv2", strides=[2] * spatial))
    h = "c2"
    if activation:
        nodes.append(helper.make_node(activation, [h], ["h2"], name="act2"))
        h = "h2"
    nodes.append(helper.make_node("Flatten", [h], ["flat"], name="flatten"))
    graph = helper.make_graph(nodes, "tinycnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels] + [size] * spatial)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    # the Gemm's input width needs the conv output size: infer it
    inferred = onnx.shape_inference.infer_shapes(model)
    flat = next(vi for vi in inferred.graph.value_info if vi.name == "flat")
    features = flat.type.tensor_type.shape.dim[1].dim_value
    model.graph.initializer.extend([_init("fc.weight", rng.normal(size=(classes, features)) / np.sqrt(features)),
                                    _init("fc.bias", rng.normal(size=classes) * 0.1)])
    model.graph.node.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    onnx.checker.check_model(model)
    return model


def sequence_mlp(seq=4, features=5, hidden=6, classes=3, seed=0, bias_left=False, opset=17):
    """x (N, seq, features) -> MatMul + Add (3-D, torch's nn.Linear on sequences) -> Tanh ->
    MatMul + Add -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    inits = [_init("l1.weight", rng.normal(size=(features, hidden)) / np.sqrt(features)),
             _init("l1.bias", rng.normal(size=hidden) * 0.3),
             _init("l2.weight", rng.normal(size=(hidden, 4)) / np.sqrt(hidden)), _init("l2.bias", rng.normal(size=4) * 0.3),
             _init("fc.weight", rng.normal(size=(classes, seq * 4)) / np.sqrt(seq * 4)), _init("fc.bias", np.zeros(classes))]
    add1 = ["l1.bias", "m1"] if bias_left else ["m1", "l1.bias"]
    nodes = [helper.make_node("MatMul", ["x", "l1.weight"], ["m1"], name="l1"),
             helper.make_node("Add", add1, ["a1"], name="l1_bias"),
             helper.make_node("Tanh", ["a1"], ["h1"], name="act1"),
             helper.make_node("MatMul", ["h1", "l2.weight"], ["m2"], name="l2"),
             helper.make_node("Add", ["m2", "l2.bias"], ["a2"], name="l2_bias"),
             helper.make_node("Tanh", ["a2"], ["h2"], name="act2"),
             helper.make_node("Flatten", ["h2"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "seqmlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def images(n=12, channels=2, size=6, spatial=2, seed=1, classes=3):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, channels) + (size,) * spatial).astype(np.float32) + 0.3,
            "y": rng.integers(0, classes, n)}
