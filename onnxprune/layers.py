"""Find the prunable layers of a graph, and say why the others cannot be pruned.

A layer computes a pre-activation ``a = W_eff z + b_eff`` with a constant weight. ``Layer`` records
where W and b live in the graph and how they map to the (out, in) view the statistics use:

- Gemm ``Y = alpha A B' + beta C`` (transB 0/1, any alpha/beta, C per output or scalar);
- MatMul ``z @ W`` followed by an Add of a per-output bias on either side; on 2-D inputs a "dense"
  layer, on inputs of rank >= 3 (batch x sequence x features) a "sequence" layer whose weight is
  shared by every position;
- Conv (1-D, 2-D, 3-D; groups, depthwise, strides, pads, auto_pad, dilations) with its bias input or
  a separate Add of a (1, C, 1, 1)-shaped constant; row i of the (out, in) view is
  ``W[i].reshape(-1)`` (in = C/groups * prod(kernel)).

The weight may be reached from its initializer through Identity, Cast, Transpose or
DequantizeLinear nodes (then "pruned" means the quantized value is set to its zero point). A layer
without a bias gets one when compensation needs it, except when an inference-mode
BatchNormalization follows it: then the shift goes to the BatchNormalization's bias, multiplied by
its scale / sqrt(var + eps), which is the same function. A BatchNormalization after a layer needs
nothing else: statistics are taken at the layer's own output (the tensor the bias shift acts on)
and the gradient flows through the BatchNormalization like through any other node.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .conv import ConvGeometry, conv_geometry

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
               onnx.TensorProto.INT32}
KINDS = ("dense", "sequence", "conv")


@dataclass(frozen=True)
class WeightStep:
    """One node between a weight's initializer and the layer: Identity, Cast, Transpose or
    DequantizeLinear (per-tensor or per-axis; scale and zero point flattened)."""

    op: str
    node: str
    perm: tuple[int, ...] | None = None
    scale: tuple[float, ...] = ()
    zero_point: tuple[float, ...] = ()
    axis: int = 1

    def _broadcast(self, values: tuple[float, ...], ndim: int) -> np.ndarray:
        a = np.asarray(values, np.float64)
        if a.size == 1:
            return a.reshape(())
        shape = [1] * ndim
        shape[self.axis % ndim] = a.size
        return a.reshape(shape)

    def forward(self, a: np.ndarray) -> np.ndarray:
        if self.op == "Transpose":
            return np.transpose(a, self.perm)
        if self.op == "DequantizeLinear":
            return (a.astype(np.float64) - self._broadcast(self.zero_point, a.ndim)) * self._broadcast(self.scale, a.ndim)
        return a

    def backward(self, a: np.ndarray) -> np.ndarray:
        """The layout inverse of forward (values are not de-scaled): for masks and positions."""
        if self.op == "Transpose":
            return np.transpose(a, np.argsort(self.perm))
        return a

    def stored_zero(self, shape: tuple[int, ...]) -> np.ndarray:
        """What 'zero' is in the stored tensor of this step's input (the zero point for DequantizeLinear)."""
        if self.op == "DequantizeLinear":
            return np.broadcast_to(self._broadcast(self.zero_point, len(shape)), shape)
        return np.zeros(shape)


@dataclass(frozen=True)
class Layer:
    """One prunable linear layer, in graph order."""

    name: str            # node name (or the weight's name when the node has none)
    op: str              # "Gemm", "MatMul" or "Conv"
    node: str            # name of the Gemm / MatMul / Conv node (unique after analyse_graph)
    weight: str          # the weight's initializer (what is pruned)
    bias: str | None     # bias initializer; None when the layer has none (a zero bias is inserted)
    input: str           # tensor z the weight multiplies
    preact: str          # tensor a = W z + b (node output, or the bias Add's output)
    out_features: int
    in_features: int
    transposed: bool     # the node's weight is (in, out) rather than (out, in)
    alpha: float = 1.0
    beta: float = 1.0
    bias_node: str | None = None  # the node holding the bias when it is not the layer's node (Add, BatchNormalization)
    kind: str = "dense"  # "dense" (one position per sample), "sequence" (MatMul on rank >= 3), "conv"
    conv: ConvGeometry | None = None
    weight_path: tuple[WeightStep, ...] = ()   # from the initializer to the node's weight input
    weight_shape: tuple[int, ...] = ()         # the weight as the node sees it
    bias_factors: tuple[float, ...] | None = None  # stored bias shift = pre-activation shift * factor (per row)
    bias_shape: tuple[int, ...] | None = None      # shape the stored bias takes (a scalar bias is expanded)
    bias_quantized: bool = False                   # integer bias behind DequantizeLinear: shifts are rounded
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.out_features * self.in_features

    @property
    def shared(self) -> bool:
        """Whether the weight is applied at several positions per sample (Conv, sequence MatMul)."""
        return self.kind != "dense"

    def node_weight(self, stored: np.ndarray) -> np.ndarray:
        """Stored initializer -> the weight as the layer's node sees it (float64)."""
        w = np.asarray(stored)
        for step in self.weight_path:
            w = step.forward(w)
        return np.asarray(w, dtype=np.float64)

    def to_rows(self, stored: np.ndarray) -> np.ndarray:
        """Stored weight -> effective (out, in) matrix as it acts on the pre-activation (float64)."""
        w = self.node_weight(stored)
        if self.op == "Conv":
            return w.reshape(self.out_features, -1)
        return self.alpha * (w.T if self.transposed else w)

    def mask_to_stored(self, rows: np.ndarray) -> np.ndarray:
        """An (out, in) array (mask or values) laid out like the stored initializer (no re-scaling)."""
        a = rows.reshape(self.weight_shape) if self.op == "Conv" else (rows.T if self.transposed else rows)
        for step in reversed(self.weight_path):
            a = step.backward(a)
        return a

    def prune_stored(self, stored: np.ndarray, rows_mask: np.ndarray) -> np.ndarray:
        """A copy of the stored weight with the masked entries zeroed (set to the zero point when quantized)."""
        out = np.array(stored, copy=True)
        mask = self.mask_to_stored(rows_mask)
        if self.weight_path and self.weight_path[0].op == "DequantizeLinear":
            out[mask] = self.weight_path[0].stored_zero(out.shape)[mask].astype(out.dtype)
        else:
            out[mask] = 0
        return out

    def bias_shift_to_stored(self, shift_rows: np.ndarray) -> np.ndarray:
        """A shift of the pre-activation -> the shift of the stored bias (Gemm divides by beta, a
        BatchNormalization bias multiplies by its scale, a quantized bias divides by its scale)."""
        if self.bias_factors is not None:
            return shift_rows * np.asarray(self.bias_factors)
        return shift_rows / self.beta


@dataclass(frozen=True)
class Skipped:
    node: str
    op: str
    reason: str


@dataclass
class GraphLayers:
    layers: list[Layer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}


LINEAR_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "Einsum", "QLinearMatMul", "MatMulInteger", "QLinearConv",
              "ConvInteger", "DeformConv")
WEIGHT_PATH_OPS = ("Identity", "Cast", "Transpose", "DequantizeLinear")


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so that layers and reports can refer to nodes."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in seen:
                candidate += "_"
            node.name = candidate
            seen.add(candidate)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Lookups over one graph: initializers, producers, consumers, outputs, ranks."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.inits = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.ranks = _tensor_ranks(model)
        # names read inside the subgraphs of If/Loop/Scan (outer-scope references), by the node holding them
        self.subgraph_readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in sorted(subgraph_reads(node)):
                self.subgraph_readers[name].append(node)

    def users(self, name: str) -> int:
        return len(self.consumers[name]) + (name in self.outputs) + len(self.subgraph_readers.get(name, ()))

    def shared_reason(self, name: str, what: str) -> str:
        inner = self.subgraph_readers.get(name)
        if inner:
            return f"{what} {name!r} is also read inside the subgraph of {inner[0].op_type} {inner[0].name!r}"
        return f"{what} {name!r} is shared by {self.users(name)} nodes"

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def constant(self, name: str) -> np.ndarray | None:
        """An initializer's value, or None (also for absent optional inputs)."""
        return self.array(name) if name in self.inits else None

    def sole_user(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers[name]
        if len(users) == 1 and users[0].op_type == op and name not in self.outputs:
            return users[0]
        return None


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read by the nodes of ``node``'s subgraphs (If branches, Loop and Scan
    bodies), nested ones included: a superset of its outer-scope references."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_reads(inner)
    return names


def _weight_path(g: _Graph, name: str, what: str = "weight") -> tuple[str, tuple[WeightStep, ...]] | str:
    """Follow ``name`` back to its initializer through Identity/Cast/Transpose/DequantizeLinear."""
    steps: list[WeightStep] = []
    current = name
    while current not in g.inits:
        node = g.producers.get(current)
        if node is None:
            return f"{what} {name!r} is a graph input, not an initializer"
        if node.op_type not in WEIGHT_PATH_OPS:
            return f"{what} {name!r} is produced by {node.op_type} {node.name!r}, not an initializer"
        if g.users(current) > 1:
            return g.shared_reason(current, what)
        attrs = _attrs(node)
        if node.op_type == "Transpose":
            step = WeightStep("Transpose", node.name, perm=tuple(int(p) for p in attrs["perm"]) if "perm" in attrs else None)
        elif node.op_type == "Cast":
            if attrs.get("to") not in FLOAT_TYPES:
                return f"{what} {name!r} is cast to a non-float type by {node.name!r}"
            step = WeightStep("Cast", node.name)
        elif node.op_type == "DequantizeLinear":
            if steps and any(s.op == "DequantizeLinear" for s in steps):
                return f"{what} {name!r} is dequantized twice"
            if attrs.get("block_size", 0):
                return f"{what} {name!r} uses blocked quantization (DequantizeLinear block_size), which is not supported"
            scale = g.constant(node.input[1])
            zero = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
            if scale is None or zero is None:
                return f"{what} {name!r}: DequantizeLinear {node.name!r} has a scale or zero point that is not an initializer"
            if node.input[0] not in g.inits:
                return f"{what} {name!r}: DequantizeLinear {node.name!r} does not read an initializer"
            step = WeightStep("DequantizeLinear", node.name, scale=tuple(map(float, scale.ravel())),
                              zero_point=tuple(map(float, zero.ravel())), axis=int(attrs.get("axis", 1)))
        else:
            step = WeightStep("Identity", node.name)
        steps.insert(0, step)
        current = node.input[0]
    if g.users(current) > 1:
        return g.shared_reason(current, what)
    dtype = g.inits[current].data_type
    if steps and steps[0].op == "DequantizeLinear":
        if dtype not in QUANT_TYPES:
            return f"{what} {current!r} has dtype {onnx.helper.tensor_dtype_to_np_dtype(dtype)}, not a supported quantized type"
    elif dtype not in FLOAT_TYPES:
        return f"{what} {name!r} has dtype {onnx.helper.tensor_dtype_to_np_dtype(dtype)}, not float"
    if any(s.op == "DequantizeLinear" for s in steps[1:]):
        return f"{what} {name!r}: DequantizeLinear after another node is not supported"
    return current, tuple(steps)


def _view_shape(g: _Graph, init: str, steps: tuple[WeightStep, ...]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in g.inits[init].dims)
    for step in steps:
        if step.op == "Transpose":
            perm = step.perm if step.perm is not None else tuple(reversed(range(len(shape))))
            shape = tuple(shape[p] for p in perm)
    return shape


def _fix_perm(steps: tuple[WeightStep, ...], g: _Graph, init: str) -> tuple[WeightStep, ...]:
    """Give default Transposes (no perm: reverse the axes) an explicit perm."""
    rank = len(g.inits[init].dims)
    return tuple(WeightStep(s.op, s.node, tuple(reversed(range(rank))), s.scale, s.zero_point, s.axis)
                 if s.op == "Transpose" and s.perm is None else s for s in steps)


def _bias_target_shape(dims: tuple[int, ...], out: int, axis_from_end: int) -> tuple[int, ...] | None:
    """The stored shape of a bias that adds one value per output channel (the channel axis being
    ``axis_from_end`` from the right of the pre-activation); None if it is not such a bias."""
    dims = tuple(int(d) for d in dims)
    for i, d in enumerate(reversed(dims), start=1):
        if d != 1 and not (i == axis_from_end and d == out):
            return None
    target = [1] * max(len(dims), axis_from_end)
    target[-axis_from_end] = out
    return tuple(target)


def _bias(g: _Graph, name: str, out: int, axis_from_end: int, what: str = "bias"):
    """(initializer, target shape, quantized, factor) of a per-output bias, or a reason."""
    resolved = _weight_path(g, name, what)
    if isinstance(resolved, str):
        return resolved
    init, steps = resolved
    if any(s.op == "Transpose" for s in steps):
        return f"{what} {name!r} is transposed"
    dims = tuple(int(d) for d in g.inits[init].dims)
    target = _bias_target_shape(dims, out, axis_from_end)
    if target is None:
        return f"{what} {name!r} has shape {list(dims)}, not one value per output"
    factor = np.ones(out)
    quantized = bool(steps and steps[0].op == "DequantizeLinear")
    if quantized:
        dq = steps[0]
        scale = np.asarray(dq.scale)
        if scale.size not in (1, out):
            return f"{what} {name!r}: its DequantizeLinear scale has {scale.size} values for {out} outputs"
        factor = 1.0 / np.broadcast_to(scale, (out,))
        target = dims if int(np.prod(dims)) == out else target
    return init, target, quantized, factor


def _batchnorm_bias(g: _Graph, preact: str, out: int):
    """When an inference-mode BatchNormalization with constant parameters is the only user of
    ``preact`` (channel axis = the layer's output axis): (node, its bias initializer, factors)."""
    bn = g.sole_user(preact, "BatchNormalization")
    if bn is None or bn.input[0] != preact:
        return None
    attrs = _attrs(bn)
    if attrs.get("training_mode", 0) or not attrs.get("spatial", 1) or sum(1 for o in bn.output if o) > 1:
        return None
    values = [g.constant(name) for name in bn.input[1:5]]
    if any(v is None or v.shape != (out,) for v in values) or g.users(bn.input[2]) > 1:
        return None
    scale, _, _, var = (v.astype(np.float64) for v in values)
    factors = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return bn, bn.input[2], factors


def analyse_graph(model: onnx.ModelProto) -> GraphLayers:
    """The prunable layers of ``model`` (names its unnamed nodes in place) and the skipped ones."""
    name_nodes(model)
    g = _Graph(model)
    found = GraphLayers()
    for node in model.graph.node:
        if node.op_type == "Gemm":
            result = _gemm(g, node)
        elif node.op_type == "MatMul":
            result = _matmul(g, node)
        elif node.op_type == "Conv":
            result = _conv(g, node)
        elif node.op_type in LINEAR_OPS:
            result = f"{node.op_type} layers are not supported"
        else:
            continue
        if isinstance(result, str):
            found.skipped.append(Skipped(node.name, node.op_type, result))
        else:
            found.layers.append(result)
    return found


def _with_bias_target(g: _Graph, layer_kwargs: dict, preact: str, out: int, axis_from_end: int, bias) -> dict:
    """Fill bias, bias_node, bias_shape, bias_factors, bias_quantized in ``layer_kwargs``."""
    if bias is not None:
        init, target, quantized, factor = bias
        layer_kwargs.update(bias=init, bias_shape=target, bias_quantized=quantized,
                            bias_factors=tuple(factor / layer_kwargs.get("beta", 1.0)) if quantized else None)
        return layer_kwargs
    if axis_from_end == layer_kwargs.get("_bn_axis"):
        bn = _batchnorm_bias(g, preact, out)
        if bn is not None:
            node, init, factors = bn
            layer_kwargs.update(bias=init, bias_node=node.name, bias_shape=(out,), bias_factors=tuple(factors),
                                beta=1.0)
            return layer_kwargs
    layer_kwargs.update(bias=None, bias_shape=(out,))  # a new bias: Gemm's C, Conv's B or an Add after a MatMul
    return layer_kwargs


def _finish(kwargs: dict) -> Layer:
    kwargs.pop("_bn_axis", None)
    return Layer(**kwargs)


def _node_weight(g: _Graph, name: str, rank: int | None = None):
    """(initializer, steps to the node, shape the node sees) of a node's weight input, or why not."""
    resolved = _weight_path(g, name)
    if isinstance(resolved, str):
        return resolved
    init, steps = resolved
    steps = _fix_perm(steps, g, init)
    shape = _view_shape(g, init, steps)
    if rank is not None and len(shape) != rank:
        return f"weight {name!r} has shape {list(shape)}, not {rank}-D"
    return init, steps, shape


def _gemm(g: _Graph, node: onnx.NodeProto) -> Layer | str:
    attrs = _attrs(node)
    if attrs.get("transA", 0):
        return "Gemm with transA=1"
    resolved = _node_weight(g, node.input[1], rank=2)
    if isinstance(resolved, str):
        return resolved
    init, steps, shape = resolved
    transposed = not attrs.get("transB", 0)
    out, inp = (shape[1], shape[0]) if transposed else shape
    beta = float(attrs.get("beta", 1.0))
    bias = None
    if len(node.input) > 2 and node.input[2] and beta != 0.0:  # beta = 0 (jax2onnx): C is ignored, no bias
        bias = _bias(g, node.input[2], out, 1)
        if isinstance(bias, str):
            return bias
    kwargs = dict(name=node.name, op="Gemm", node=node.name, weight=init, input=node.input[0], preact=node.output[0],
                  out_features=int(out), in_features=int(inp), transposed=transposed, alpha=float(attrs.get("alpha", 1.0)),
                  beta=beta if bias is not None else 1.0, weight_path=steps, weight_shape=shape, _bn_axis=1)
    return _finish(_with_bias_target(g, kwargs, node.output[0], int(out), 1, bias))


def _matmul(g: _Graph, node: onnx.NodeProto) -> Layer | str:
    if isinstance(_weight_path(g, node.input[0]), tuple) and isinstance(_weight_path(g, node.input[1]), str):
        return "weight on the left of MatMul (W @ z) is not supported"
    resolved = _node_weight(g, node.input[1], rank=2)
    if isinstance(resolved, str):
        return resolved
    init, steps, shape = resolved
    rank = g.ranks.get(node.input[0])
    if rank is None:
        return "MatMul input has unknown rank (shape inference could not tell)"
    if rank < 2:
        return f"MatMul input has rank {rank}; a layer needs a batch axis"
    inp, out = shape
    bias, bias_node, preact = None, None, node.output[0]
    add = g.sole_user(node.output[0], "Add")
    if add is not None:
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        found = _bias(g, other, int(out), 1)
        if not isinstance(found, str) and len(g.inits[found[0]].dims) <= rank:
            bias, bias_node, preact = found, add.name, add.output[0]
    kwargs = dict(name=node.name, op="MatMul", node=node.name, weight=init, input=node.input[0], preact=preact,
                  out_features=int(out), in_features=int(inp), transposed=True, bias_node=bias_node,
                  kind="dense" if rank == 2 else "sequence", weight_path=steps, weight_shape=shape,
                  _bn_axis=1 if rank == 2 else None)
    kwargs = _with_bias_target(g, kwargs, preact, int(out), 1, bias)
    if bias is not None:
        kwargs["bias_node"] = bias_node
    return _finish(kwargs)


def _conv(g: _Graph, node: onnx.NodeProto) -> Layer | str:
    resolved = _node_weight(g, node.input[1])
    if isinstance(resolved, str):
        return resolved
    init, steps, shape = resolved
    geo = conv_geometry(_attrs(node), shape)
    if isinstance(geo, str):
        return geo
    out, spatial = int(shape[0]), len(shape) - 2
    axis_from_end = spatial + 1
    bias, bias_node, preact = None, None, node.output[0]
    if len(node.input) > 2 and node.input[2]:
        bias = _bias(g, node.input[2], out, 1)
        if isinstance(bias, str):
            return bias
        bias = (bias[0], (out,), bias[2], bias[3])
    else:
        add = g.sole_user(node.output[0], "Add")
        if add is not None:
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            found = _bias(g, other, out, axis_from_end)
            if not isinstance(found, str) and len(g.inits[found[0]].dims) <= spatial + 2:
                bias, bias_node, preact = found, add.name, add.output[0]
    kwargs = dict(name=node.name, op="Conv", node=node.name, weight=init, input=node.input[0], preact=preact,
                  out_features=out, in_features=int(np.prod(shape[1:])), transposed=False, kind="conv", conv=geo,
                  weight_path=steps, weight_shape=shape, _bn_axis=axis_from_end)
    kwargs = _with_bias_target(g, kwargs, preact, out, axis_from_end, bias)
    if bias is not None and bias_node is not None:
        kwargs["bias_node"] = bias_node
    return _finish(kwargs)


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the tensors shape inference can tell (graph inputs, intermediates)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is advisory here; fall back to declared inputs
        inferred = model
    ranks = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    for init in model.graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the graph's tensors, as shape inference sees them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # advisory only: callers fall back to a default type
        inferred = model
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return {k: v for k, v in types.items() if v}


def read_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


PROBABILITY_OPS = {"Softmax": "probabilities", "LogSoftmax": "log-probabilities"}


def protected_output(model: onnx.ModelProto, output: str | None = None) -> str:
    """The tensor ECP protects: ``output`` if given, else the model's scores (``scored_output``)
    read before a final Softmax/LogSoftmax (the logits are protected)."""
    name = scored_output(model, output)
    if output is not None:
        return name
    return _before_probabilities(name, {out: node for node in model.graph.node for out in node.output})


def scored_output(model: onnx.ModelProto, output: str | None = None) -> str:
    """The model's scores: ``output`` if given (a graph output or any node output), else the first
    graph output that is a float tensor, read before a ZipMap (skl2onnx classifiers: the label
    output and the ZipMap of probabilities are passed over). What ``evaluate`` scores."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    if output is not None:
        if output not in producers:
            from .errors import InputError

            names = [o.name for o in graph.output]
            raise InputError(f"no tensor named {output!r} in the model (outputs: {names})")
        return output
    types = None
    for candidate in graph.output:
        name = candidate.name
        node = producers.get(name)
        if node is not None and node.op_type == "ZipMap":
            name = node.input[0]
            node = producers.get(name)
        if name == candidate.name and candidate.type.WhichOneof("value") not in (None, "tensor_type"):
            continue  # a sequence or map output
        elem = candidate.type.tensor_type.elem_type if name == candidate.name else 0
        if not elem:
            types = tensor_types(model) if types is None else types
            elem = types.get(name, 0)
        if elem and elem not in FLOAT_TYPES:
            continue  # labels, indices, strings
        return name
    from .errors import InputError

    raise InputError(f"the model has no float tensor output to protect (outputs: {[o.name for o in graph.output]}); "
                     "name one with --output")


def _before_probabilities(name: str, producers: dict) -> str:
    """The logits behind a final Softmax/LogSoftmax (also through Identity nodes), else ``name``."""
    node, walked = producers.get(name), name
    while node is not None and node.op_type in ("Identity", *PROBABILITY_OPS):
        walked = node.input[0]
        if node.op_type in PROBABILITY_OPS:
            name = walked
        node = producers.get(walked)
    return name


def reaching(model: onnx.ModelProto, layers: list[Layer], output: str) -> tuple[list[Layer], list[Skipped]]:
    """The layers whose pre-activation ``output`` depends on, and the others as Skipped: ECP would
    see no output sensitivity for them (G = 0) and prune them first."""
    producers = {out: node for node in model.graph.node for out in node.output}
    upstream, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in upstream:
            continue
        upstream.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    kept = [layer for layer in layers if layer.preact in upstream]
    dropped = [Skipped(layer.node, layer.op, f"does not reach the protected output {output!r} (choose it with --output)")
               for layer in layers if layer.preact not in upstream]
    return kept, dropped


def output_kind(model: onnx.ModelProto, name: str) -> str:
    """'logits', 'probabilities' or 'log-probabilities', from the node that produces ``name``."""
    for node in model.graph.node:
        if name in node.output:
            return PROBABILITY_OPS.get(node.op_type, "logits")
    return "logits"
