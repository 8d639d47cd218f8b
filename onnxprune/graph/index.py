"""One index of a graph, built once: initializers, producers, consumers, subgraph uses, ranks, types.

Every step that walks the graph (the layer matchers, unit groups, instrumentation, output
selection) asks this index rather than rebuilding its own ``{output: node}`` map.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """``{tensor: the node that outputs it}`` of one graph (its subgraphs not included)."""
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: the nodes that read it}`` of one graph, in node order (its subgraphs' reads not included)."""
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def subgraph_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: the If/Loop/Scan nodes whose subgraphs read it}`` (outer-scope references), in node order."""
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in subgraph_reads(node):
            found[name].append(node)
    return found


def upstream(producer_of: dict[str, onnx.NodeProto], name: str) -> set[str]:
    """Every tensor ``name`` depends on (through ``producer_of``, a ``producers`` map), ``name`` included."""
    seen: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        node = producer_of.get(current)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def default_opset(model: onnx.ModelProto, absent=None):
    """The version of the default (ai.onnx) domain ``model`` imports, ``absent`` when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), absent)


def topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in their order, each moved after the nodes computing its inputs where it was not."""
    made = {o: k for k, n in enumerate(nodes) for o in n.output}
    done: set[int] = set()
    order = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            k, ready = stack.pop()
            if k in done:
                continue
            if ready:
                done.add(k)
                order.append(nodes[k])
                continue
            stack.append((k, True))
            stack.extend((made[i], False) for i in reversed(nodes[k].input) if i in made and made[i] not in done)
    return order


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


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


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (in place), so that layers and reports can refer to nodes."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in seen:
                candidate += "_"
            node.name = candidate
            seen.add(candidate)


SMALL = 8           # elements: float initializers up to this size (Resize scales) and every other keep their values
MEMO_VERSIONS = 32  # model versions whose inferred shapes are remembered (weight-less: small)


def inferred(model: onnx.ModelProto, data_prop: bool = False) -> onnx.ModelProto:
    """``model``'s graph with inferred value infos (read-only: shared by every caller of the same model
    version), or ``model`` itself where inference fails: shapes and types are advisory to every caller,
    which falls back to what the model declares. Inference runs once per model version, on a copy
    without the float weights' values (their shapes and types are what inference reads), keyed by the
    graph's structure and those shapes; an edit that changes shapes or nodes is a new version."""
    key = _structure_key(model, data_prop)
    if key in _INFERRED:
        _INFERRED.move_to_end(key)
        return _INFERRED[key]
    try:
        result = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - onnx raises several unrelated types here
        result = model
    _INFERRED[key] = result
    while len(_INFERRED) > MEMO_VERSIONS:
        _INFERRED.popitem(last=False)
    return result


_INFERRED: OrderedDict[bytes, onnx.ModelProto] = OrderedDict()


def _kept_whole(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type not in FLOAT_TYPES or int(np.prod(tensor.dims)) <= SMALL


def _structure_key(model: onnx.ModelProto, data_prop: bool) -> bytes:
    digest = hashlib.sha256(f"{model.ir_version}:{data_prop}".encode())
    for opset in model.opset_import:
        digest.update(f"{opset.domain}:{opset.version}".encode())
    graph = model.graph
    for part in (*graph.node, *graph.input, *graph.output, *graph.value_info):
        digest.update(part.SerializeToString())
    for tensor in graph.initializer:
        digest.update(f"{tensor.name}:{tensor.data_type}:{tuple(tensor.dims)}".encode())
        if _kept_whole(tensor):
            digest.update(tensor.SerializeToString())
    return digest.digest()


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model of the same graph whose large float initializers are graph inputs of their shape and type."""
    copy = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    graph, source = copy.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {vi.name for vi in source.input}
    for tensor in source.initializer:
        if _kept_whole(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return copy


def tensor_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the tensors shape inference can tell (graph inputs, intermediates, initializers),
    None for a dimension it cannot."""
    found = inferred(model)
    dims: dict[str, tuple[int | None, ...]] = {}
    for vi in [*found.graph.input, *found.graph.value_info, *found.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in model.graph.initializer:
        dims[init.name] = tuple(init.dims)
    return dims


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the tensors shape inference can tell (graph inputs, intermediates, initializers)."""
    return {name: len(shape) for name, shape in tensor_dims(model).items()}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the graph's tensors, as shape inference sees them."""
    graph = inferred(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return {k: v for k, v in types.items() if v}


def read_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


class GraphIndex:
    """Lookups over one model's main graph: initializers, producers, consumers, outputs, ranks, and
    the outer-scope names its subgraphs read. Built once per analysis; the model must not change
    while the index is in use."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.inits = {t.name: t for t in graph.initializer}
        self.producers = producers(graph)
        self.consumers = consumers(graph)
        self.outputs = {o.name for o in graph.output}
        self.dims = tensor_dims(model)
        self.ranks = {name: len(shape) for name, shape in self.dims.items()}
        self.nodes = {node.name: node for node in graph.node}
        self.subgraph_readers = subgraph_readers(graph)  # outer-scope names, by the node whose subgraph reads them

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


class Rejection(Exception):
    """Why a pattern did not match (onnxscript's ``MatchResult.fail``): a matcher returns the thing it
    found or one of these (``fail``), and a walk that cannot pass a node raises one; the reason reaches
    ``inspect`` and ``-v`` as it is. ``unavoidable``: no rewrite could get past it (``Unavoidable``)."""

    unavoidable = False

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __eq__(self, other: object) -> bool:  # a value: two rejections for one reason are the same
        return type(other) is type(self) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash((type(self), self.reason))


def fail(reason: str) -> Rejection:
    return Rejection(reason)
