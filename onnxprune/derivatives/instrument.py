"""The instrumented analysis copy both gradient engines differentiate.

We add a zero "offset" input to each layer's pre-activation: the derivative of the protected
output y with respect to it is, per sample, the output Jacobian at that pre-activation (samples do
not interact). The engines (``onnxprune.derivatives.engines``) turn this copy into a derivative graph:
onnx-ad's reverse mode (``adjoint``) or onnxruntime-training's GradientGraphBuilder
(``ort-training``).

The offsets have the pre-activation's full shape per sample ((C, H, W) for a Conv, (S, out) for a
MatMul on sequences; (S, out) reshaped to the rows (N x S, out) for a folded layer, so that its
derivative comes out grouped by sample), and the graph inputs are declared with the data's per-sample shape (the
training build's MaxPool gradient crashes on tensors of unknown shape; onnx-ad's Conv and Slice
rules need declared shapes). Statistics run on a float32 copy of float16 models, and on a copy
whose activation fake quantization (QuantizeLinear -> DequantizeLinear pairs) is replaced by
identities (a straight-through estimate: quantization has no gradient); the pruned model keeps its
own types.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.find.layers import Layer
from onnxprune.graph.index import producers, tensor_types
from onnxprune.graph.passes import BATCH, AffineBatchNormalization, derivative_copy, needed_nodes

PROBE = "onnxprune__probe"


LABELS = "onnxprune__labels"


OBJECTIVE = "onnxprune__objective"


def offset_name(layer: Layer) -> str:
    return f"onnxprune__offset__{layer.preact}"


def batch_dims(shape) -> list:
    return [BATCH, *map(int, shape)]


def instrument(model: onnx.ModelProto, layers: list[Layer], output: str, extra_outputs: list[str],
               shapes: dict[str, tuple[int, ...]], min_opset: int | None = None,
               spell: Callable[[onnx.NodeProto], list[onnx.NodeProto]] = lambda node: [node]) -> tuple[onnx.ModelProto, int]:
    """A prepared copy with an offset input added to every pre-activation, only the nodes needed
    for ``output`` and ``extra_outputs`` (which become its outputs), and graph inputs declared with
    their per-sample shapes from ``shapes``. ``spell`` rewrites a node into ops the engine can
    differentiate (the training build has no PRelu gradient)."""
    m = derivative_copy(model, min_opset)
    graph = m.graph
    types = tensor_types(m)
    elem = TensorProto.FLOAT if types.get(output) in (None, TensorProto.FLOAT) else types[output]
    producer_of = producers(graph)
    new_nodes = []
    for layer in layers:
        node = producer_of[layer.preact]
        raw = f"{layer.preact}__onnxprune_raw"
        node.output[list(node.output).index(layer.preact)] = raw
        offset = [] if layer.kind != "folded" else [  # (batch, S, out) -> the rows (batch x S, out)
            helper.make_node("Constant", [], [f"{offset_name(layer)}__rows_shape"], name=f"onnxprune__offset_shape__{layer.name}",
                             value=numpy_helper.from_array(np.array([-1, layer.out_features], np.int64))),
            helper.make_node("Reshape", [offset_name(layer), f"{offset_name(layer)}__rows_shape"],
                             [f"{offset_name(layer)}__rows"], name=f"onnxprune__offset_rows__{layer.name}")]
        added = offset[-1].output[0] if offset else offset_name(layer)
        new_nodes.append((node, *offset, helper.make_node("Add", [raw, added], [layer.preact],
                                                          name=f"onnxprune__offset_add__{layer.name}")))
        graph.input.append(helper.make_tensor_value_info(offset_name(layer), types.get(layer.preact, elem),
                                                         batch_dims(shapes[layer.preact])))
    for producer, *added in new_nodes:
        at = list(graph.node).index(producer) + 1
        for k, node in enumerate(added):
            graph.node.insert(at + k, node)
    nodes = [n for node in needed_nodes(graph.node, {output, *extra_outputs}) for n in spell(node)]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in shapes and vi.name not in inits:
            vi.type.tensor_type.ClearField("shape")
            for d in batch_dims(shapes[vi.name]):
                dim = vi.type.tensor_type.shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d
    del graph.value_info[:]
    AffineBatchNormalization()(m)
    del graph.output[:]
    for name in extra_outputs:  # a copy, so that optimizations that remove the tensor (a no-op Cast) keep the output
        if name != OBJECTIVE:
            graph.node.append(helper.make_node("Identity", [name], [exposed(name)], name=f"{exposed(name)}_copy"))
    graph.output.extend(helper.make_tensor_value_info(name if name == OBJECTIVE else exposed(name), types.get(name, elem), None)
                        for name in extra_outputs)
    return m, elem


def exposed(name: str) -> str:
    return f"{name}__onnxprune_z"
