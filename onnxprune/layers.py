"""Find the prunable layers of a graph, and say why the others cannot be pruned.

A layer computes a pre-activation ``a = W_eff z + b_eff`` with a constant weight initializer.
``Layer`` records where W and b live in the graph and how they map to the (out, in) view the
statistics use: Gemm ``Y = alpha A B' + beta C`` (transB 0/1), and MatMul ``z @ W`` followed by an
Add of a 1-D bias on either side.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass(frozen=True)
class Layer:
    """One prunable linear layer, in graph order."""

    name: str            # node name (or the weight's name when the node has none)
    op: str              # "Gemm" or "MatMul"
    node: str            # name of the Gemm / MatMul node (unique after analyse_graph)
    weight: str          # weight initializer
    bias: str | None     # bias initializer; None when the layer has none (a zero bias is inserted)
    input: str           # tensor z the weight multiplies
    preact: str          # tensor a = W z + b (Gemm output, or the bias Add's output)
    out_features: int
    in_features: int
    transposed: bool     # stored weight is (in, out) rather than (out, in)
    alpha: float = 1.0
    beta: float = 1.0
    bias_node: str | None = None  # the Add node holding a MatMul's bias

    @property
    def size(self) -> int:
        return self.out_features * self.in_features

    def to_rows(self, stored: np.ndarray) -> np.ndarray:
        """Stored weight -> effective (out, in) matrix as it acts on the pre-activation (float64)."""
        w = np.asarray(stored, dtype=np.float64)
        return self.alpha * (w.T if self.transposed else w)

    def mask_to_stored(self, rows_mask: np.ndarray) -> np.ndarray:
        return rows_mask.T if self.transposed else rows_mask

    def bias_shift_to_stored(self, shift_rows: np.ndarray) -> np.ndarray:
        """A shift of the pre-activation -> the shift of the stored bias (Gemm divides by beta)."""
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


LINEAR_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "Einsum", "QLinearMatMul", "MatMulInteger", "QLinearConv")


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


def analyse_graph(model: onnx.ModelProto) -> GraphLayers:
    """The prunable layers of ``model`` (names its unnamed nodes in place) and the skipped ones."""
    name_nodes(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    ranks = _tensor_ranks(model)
    found = GraphLayers()

    def skip(node, reason):
        found.skipped.append(Skipped(node.name, node.op_type, reason))

    def weight_problem(name: str) -> str | None:
        if name not in inits:
            src = producers.get(name)
            return f"weight {name!r} is not an initializer" + (f" (produced by {src.op_type} {src.name!r})" if src else " (a graph input)")
        if len(consumers[name]) > 1:
            return f"weight {name!r} is shared by {len(consumers[name])} nodes"
        if inits[name].data_type not in FLOAT_TYPES:
            return f"weight {name!r} has dtype {onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)}, not float"
        if len(inits[name].dims) != 2:
            return f"weight {name!r} has shape {list(inits[name].dims)}, not 2-D"
        return None

    def bias_problem(name: str, out: int) -> str | None:
        if name not in inits:
            return f"bias {name!r} is not an initializer"
        if len(consumers[name]) > 1:
            return f"bias {name!r} is shared by {len(consumers[name])} nodes"
        dims = list(inits[name].dims)
        if int(np.prod(dims)) not in (1, out) or (len(dims) == 2 and dims[0] != 1) or len(dims) > 2:
            return f"bias {name!r} has shape {dims}, not a per-output vector"
        return None

    for node in graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                skip(node, "Gemm with transA=1")
                continue
            problem = weight_problem(node.input[1])
            if problem:
                skip(node, problem)
                continue
            transposed = not attrs.get("transB", 0)
            rows, cols = inits[node.input[1]].dims
            out, inp = (cols, rows) if transposed else (rows, cols)
            beta = float(attrs.get("beta", 1.0))
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None:
                if beta == 0.0:
                    skip(node, "Gemm with beta=0 ignores its bias")
                    continue
                problem = bias_problem(bias, out)
                if problem:
                    skip(node, problem)
                    continue
            found.layers.append(Layer(
                name=node.name, op="Gemm", node=node.name, weight=node.input[1], bias=bias,
                input=node.input[0], preact=node.output[0], out_features=int(out), in_features=int(inp),
                transposed=transposed, alpha=float(attrs.get("alpha", 1.0)), beta=beta if bias else 1.0,
            ))
        elif node.op_type == "MatMul":
            if node.input[0] in inits and node.input[1] not in inits:
                skip(node, "weight on the left of MatMul (W @ z) is not supported")
                continue
            problem = weight_problem(node.input[1])
            if problem:
                skip(node, problem)
                continue
            rank = ranks.get(node.input[0])
            if rank != 2:
                skip(node, f"MatMul input has rank {rank if rank is not None else 'unknown'}; only 2-D inputs are supported")
                continue
            inp, out = inits[node.input[1]].dims
            bias, bias_node, preact = None, None, node.output[0]
            users = consumers[node.output[0]]
            if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in graph_outputs:
                add = users[0]
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                if bias_problem(other, out) is None:
                    bias, bias_node, preact = other, add.name, add.output[0]
            found.layers.append(Layer(
                name=node.name, op="MatMul", node=node.name, weight=node.input[1], bias=bias,
                input=node.input[0], preact=preact, out_features=int(out), in_features=int(inp),
                transposed=True, bias_node=bias_node,
            ))
        elif node.op_type in LINEAR_OPS:
            skip(node, f"{node.op_type} layers are not supported yet")
    return found


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
    """The tensor ECP protects: ``output`` if given (a graph output or any node output), else the
    model's first output; when that tensor comes out of Softmax/LogSoftmax, the logits before it."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    if output is not None:
        if output not in producers:
            from .errors import InputError

            names = [o.name for o in graph.output]
            raise InputError(f"no tensor named {output!r} in the model (outputs: {names})")
        return output
    name = graph.output[0].name
    node = producers.get(name)
    while node is not None and node.op_type in PROBABILITY_OPS:
        name = node.input[0]
        node = producers.get(name)
    return name


def output_kind(model: onnx.ModelProto, name: str) -> str:
    """'logits', 'probabilities' or 'log-probabilities', from the node that produces ``name``."""
    for node in model.graph.node:
        if name in node.output:
            return PROBABILITY_OPS.get(node.op_type, "logits")
    return "logits"
