"""The instrumented analysis copy both gradient engines differentiate.

We add a zero "offset" input to each layer's pre-activation: the derivative of the protected
output y with respect to it is, per sample, the output Jacobian at that pre-activation (samples do
not interact). The engines (``onnxprune.engines``) turn this copy into a derivative graph:
onnx-ad's reverse mode (``adjoint``) or onnxruntime-training's GradientGraphBuilder
(``ort-training``).

The offsets have the pre-activation's full shape per sample ((C, H, W) for a Conv, (S, out) for a
MatMul on sequences), and the graph inputs are declared with the data's per-sample shape (the
training build's MaxPool gradient crashes on tensors of unknown shape; onnx-ad's Conv and Slice
rules need declared shapes). Statistics run on a float32 copy of float16 models, and on a copy
whose activation fake quantization (QuantizeLinear -> DequantizeLinear pairs) is replaced by
identities (a straight-through estimate: quantization has no gradient); the pruned model keeps its
own types.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import runtime
from .graph import subgraph_reads, tensor_types
from .layers import Layer

PROBE = "onnxprune__probe"
LABELS = "onnxprune__labels"
OBJECTIVE = "onnxprune__objective"
BATCH = "onnxprune__batch"
HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def offset_name(layer: Layer) -> str:
    return f"onnxprune__offset__{layer.preact}"


def has_half_floats(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return any(t.data_type in HALF_TYPES for t in graph.initializer) or any(
        vi.type.tensor_type.elem_type in HALF_TYPES for vi in [*graph.input, *graph.output])


def float32_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computing in float32 where it used float16/bfloat16: initializers, Constant values,
    Cast targets, inputs and outputs. Statistics are taken on this copy."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    for i, t in enumerate(graph.initializer):
        if t.data_type in HALF_TYPES:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type in HALF_TYPES:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                                "RandomUniformLike") and attr.name in ("to", "dtype") and attr.i in HALF_TYPES:
                attr.i = TensorProto.FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    return m


def strip_fake_quantization(model: onnx.ModelProto) -> None:
    """Replace DequantizeLinear(QuantizeLinear(x)) on activations by Identity(x), in place."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for i, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            graph.node[i].CopyFrom(helper.make_node("Identity", [q.input[0]], [node.output[0]], name=node.name))


def affine_batchnorm(model: onnx.ModelProto) -> None:
    """Spell inference-mode BatchNormalization (constant parameters) as Mul + Add, in place.

    The training build differentiates BatchNormalization as in training mode (through the batch
    statistics), which is not the function an exported model computes; x * f + (B - mean * f) with
    f = scale / sqrt(var + eps) is, and its gradient is the right one."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            if vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    except Exception:  # no ranks: the nodes stay BatchNormalization
        pass
    for i, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or sum(1 for o in node.output if o) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rank = ranks.get(node.input[0])
        if attrs.get("training_mode", 0) or rank is None or rank < 2 or not all(n in inits for n in node.input[1:5]):
            continue
        scale, bias, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[1:5])
        factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shape = (-1,) + (1,) * (rank - 2)
        dtype = numpy_helper.to_array(inits[node.input[1]]).dtype
        tag = f"{node.output[0]}__onnxprune_bn"
        graph.initializer.extend([numpy_helper.from_array(factor.reshape(shape).astype(dtype), f"{tag}_factor"),
                                  numpy_helper.from_array((bias - mean * factor).reshape(shape).astype(dtype), f"{tag}_shift")])
        mul = helper.make_node("Mul", [node.input[0], f"{tag}_factor"], [f"{tag}_scaled"], name=f"{tag}_mul")
        add = helper.make_node("Add", [f"{tag}_scaled", f"{tag}_shift"], [node.output[0]], name=node.name)
        graph.node[i].CopyFrom(mul)
        graph.node.insert(i + 1, add)


def prepare(model: onnx.ModelProto, min_opset: int | None = None) -> onnx.ModelProto:
    """The copy statistics run on: runtime-stamped (up-converted below ``min_opset``), float32,
    without activation fake quantization."""
    m = runtime.runtime_copy(model)
    if min_opset is not None:
        m = runtime.upgrade_opset(m, min_opset)
    if has_half_floats(m):
        m = float32_copy(m)
    strip_fake_quantization(m)
    return m


def needed_graph_nodes(graph: onnx.GraphProto, targets: set[str]) -> list[onnx.NodeProto]:
    return needed_nodes(graph.node, targets)


def needed_nodes(nodes, targets: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in order) that ``targets`` depend on, through subgraph (If/Loop/Scan) reads too."""
    needed, keep = set(targets), []
    for node in reversed(list(nodes)):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(subgraph_reads(node))
    return list(reversed(keep))


def tensor_shapes(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray],
                  provider: str = "cpu") -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of tensors ``names`` (graph inputs or computed), from one sample of ``feeds``."""
    shapes = {k: tuple(v.shape[1:]) for k, v in feeds.items() if k in names}
    wanted = [n for n in dict.fromkeys(names) if n not in shapes]
    if wanted:
        values = runtime.run_tensors(free_batch(runtime.runtime_copy(model)), {k: v[:1] for k, v in feeds.items()}, wanted, provider)
        shapes.update({n: tuple(v.shape[1:]) for n, v in zip(wanted, values)})
    return shapes


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose real graph inputs have a free first (batch) dimension (exporters often fix it
    to the example's batch size) and no stale intermediate shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and vi.type.HasField("tensor_type") and len(dims):
            dims[0].Clear()
            dims[0].dim_param = BATCH
    for vi in m.graph.output:
        if vi.type.HasField("tensor_type") and len(vi.type.tensor_type.shape.dim):
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH
    del m.graph.value_info[:]
    return m


def output_shape(model: onnx.ModelProto, output: str, feeds: dict[str, np.ndarray], provider: str = "cpu") -> tuple[int, ...]:
    """Shape of tensor ``output`` for one sample (run on the first sample of ``feeds``)."""
    return tensor_shapes(model, [output], feeds, provider)[output]


def batch_dims(shape) -> list:
    return [BATCH, *map(int, shape)]


def instrument(model: onnx.ModelProto, layers: list[Layer], output: str, extra_outputs: list[str],
               shapes: dict[str, tuple[int, ...]], min_opset: int | None = None,
               spell: Callable[[onnx.NodeProto], list[onnx.NodeProto]] = lambda node: [node]) -> tuple[onnx.ModelProto, int]:
    """A prepared copy with an offset input added to every pre-activation, only the nodes needed
    for ``output`` and ``extra_outputs`` (which become its outputs), and graph inputs declared with
    their per-sample shapes from ``shapes``. ``spell`` rewrites a node into ops the engine can
    differentiate (the training build has no PRelu gradient)."""
    m = prepare(model, min_opset)
    graph = m.graph
    types = tensor_types(m)
    elem = TensorProto.FLOAT if types.get(output) in (None, TensorProto.FLOAT) else types[output]
    producers = {out: node for node in graph.node for out in node.output}
    new_nodes = []
    for layer in layers:
        node = producers[layer.preact]
        raw = f"{layer.preact}__onnxprune_raw"
        node.output[list(node.output).index(layer.preact)] = raw
        new_nodes.append((node, helper.make_node("Add", [raw, offset_name(layer)], [layer.preact],
                                                 name=f"onnxprune__offset_add__{layer.name}")))
        graph.input.append(helper.make_tensor_value_info(offset_name(layer), types.get(layer.preact, elem),
                                                         batch_dims(shapes[layer.preact])))
    for producer, add in new_nodes:
        graph.node.insert(list(graph.node).index(producer) + 1, add)
    nodes = [n for node in needed_graph_nodes(graph, {output, *extra_outputs}) for n in spell(node)]
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
    affine_batchnorm(m)
    del graph.output[:]
    for name in extra_outputs:  # a copy, so that optimizations that remove the tensor (a no-op Cast) keep the output
        if name != OBJECTIVE:
            graph.node.append(helper.make_node("Identity", [name], [exposed(name)], name=f"{exposed(name)}_copy"))
    graph.output.extend(helper.make_tensor_value_info(name if name == OBJECTIVE else exposed(name), types.get(name, elem), None)
                        for name in extra_outputs)
    return m, elem


def exposed(name: str) -> str:
    return f"{name}__onnxprune_z"


def by_position(layer: Layer, g: np.ndarray) -> np.ndarray:
    """Derivatives at a pre-activation, (rows, *preact shape) -> (rows, out, positions)."""
    rows = len(g)
    if layer.kind == "sequence":  # (rows, ..., out): positions are the middle axes
        return np.moveaxis(g.reshape(rows, -1, layer.out_features), 2, 1)
    return g.reshape(rows, layer.out_features, -1)  # dense (rows, out) or conv (rows, out, *spatial)
