"""The pruned network cut before every refit layer, so the chained refit runs it once, piece by piece.

The chained refit fits each layer on the inputs the pruned network before it produces, its earlier
layers already refit. Running the whole network to every layer's input costs one forward pass per
layer (onnxruntime computes the whole graph whatever is fetched). Here the graph is cut before every
layer's node, in graph order: the cut holds, for every calibration batch, each tensor computed
before the node that a later node still needs (a transformer's residual stream, its masks and
positions). After a layer is refit, the piece from its cut computes the next cut, and the next
layer's pre-activation with its current weights, with the refit weights: the whole refit costs
about one forward pass, as SparseGPT's block-by-block pass does, on any graph. The pieces take every
refit layer's weight and bias as inputs, so a later step feeds new values into the same sessions.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.find.layers import Layer
from onnxprune.graph.index import subgraph_reads, tensor_types
from onnxprune.repair.base import parametric, structure_key

CUT_BYTES = 512 * 2**20  # cached cut values up to this size for all batches together; beyond, no pieces


class Pieces:
    """The network in pieces between ``layers`` (graph order), each a session from the values cut
    before one layer to those cut before the next and the next layer's fit target (``targets``:
    the tensor holding each layer's pre-activation with its bias)."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], targets: dict[str, str], provider, threads):
        self.key = structure_key(model)
        m = runtime.runtime_copy(model)
        nodes = list(m.graph.node)
        at = {node.name: i for i, node in enumerate(nodes)}
        self.layers = sorted(layers, key=lambda layer: at[layer.node])
        self.params = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        inits = {t.name for t in m.graph.initializer}
        self.feeds = [vi.name for vi in m.graph.input if vi.name not in inits]
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        wanted = [name for layer in self.layers for name in (layer.input, targets[layer.name])]
        needed = _needed(nodes, producer, wanted)
        starts = [at[layer.node] for layer in self.layers]
        cuts = [self._cut(nodes, producer, needed, start, inits) for start in starts]
        types = tensor_types(m)
        self.cuts = cuts
        self.targets = [targets[layer.name] for layer in self.layers]
        # piece k computes cut k+1 and target k+1 from cut k (piece -1: from the graph inputs)
        sources = [list(self.feeds)] + cuts[:-1]
        self.outputs = [list(dict.fromkeys(cut + [target])) for cut, target in zip(cuts, self.targets)]
        self.sessions = [_piece(m, nodes, producer, source, outputs, self.params, inits, types, provider, threads)
                         for source, outputs in zip(sources, self.outputs)]
        self.values: dict[str, np.ndarray] = {}
        self.cache: list[dict[str, np.ndarray]] = []

    @staticmethod
    def _cut(nodes, producer, needed, start: int, inits: set[str]) -> list[str]:
        """Tensors computed before node ``start`` (or fed) that a needed node at or after it reads."""
        cut = []
        for i in sorted(needed):
            if i < start:
                continue
            for name in [*nodes[i].input, *subgraph_reads(nodes[i])]:
                if name and name not in inits and producer.get(name, -1) < start:
                    cut.append(name)
        return list(dict.fromkeys(cut))

    def update(self, model: onnx.ModelProto, names=None) -> None:
        """Read the layers' weights and biases (or only ``names``) from ``model``."""
        wanted = set(self.params if names is None else names)
        self.values.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted})

    def start(self, batches: list[dict[str, np.ndarray]]) -> bool:
        """Run the first piece on every batch; False (and nothing kept) when the cut values would pass
        CUT_BYTES."""
        self.batches = batches
        self.cache = [self._run(0, feeds) for feeds in batches]
        if sum(v.nbytes for values in self.cache for v in values.values()) > CUT_BYTES:
            self.cache = []
            return False
        return True

    def advance(self, k: int) -> None:
        """After layer ``k``'s refit: the cut before layer k + 1, computed with the new weights."""
        self.cache = [self._run(k + 1, {**feeds, **values}) for feeds, values in zip(self.batches, self.cache)]

    def _run(self, piece: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Piece ``piece`` on ``values`` (the batch's feeds and the previous cut): its cut and target."""
        names = self.outputs[piece]
        return dict(zip(names, self.sessions[piece].run(names, {**values, **self.values})))


def _needed(nodes, producer: dict[str, int], wanted: list[str]) -> set[int]:
    """Indices of the nodes ``wanted`` tensors depend on."""
    found: set[int] = set()
    stack = [producer[name] for name in wanted if name in producer]
    while stack:
        i = stack.pop()
        if i in found:
            continue
        found.add(i)
        stack.extend(producer[name] for name in [*nodes[i].input, *subgraph_reads(nodes[i])] if name in producer)
    return found


def _piece(m: onnx.ModelProto, nodes, producer, sources: list[str], outputs: list[str], params: list[str],
           inits: set[str], types: dict[str, int], provider, threads):
    """A session computing ``outputs`` from ``sources`` (and the graph's constants), the layers'
    weights and biases ``params`` as inputs."""
    known = set(sources)
    chosen: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer and name not in known]
    while stack:
        i = stack.pop()
        if i in chosen:
            continue
        chosen.add(i)
        stack.extend(producer[name] for name in [*nodes[i].input, *subgraph_reads(nodes[i])]
                     if name in producer and name not in known)
    piece = [nodes[i] for i in sorted(chosen)]
    read = {name for node in piece for name in [*node.input, *subgraph_reads(node)] if name}
    part = onnx.ModelProto()
    part.CopyFrom(m)
    graph = part.graph
    graph.ClearField("node")
    graph.node.extend(piece)
    kept = [t for t in m.graph.initializer if t.name in read or t.name in outputs]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    graph.ClearField("value_info")
    graph.ClearField("input")
    graph.input.extend(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                       for name in sources if name in read or name in outputs)
    graph.ClearField("output")
    graph.output.extend(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                        for name in outputs)
    parametric(part, [p for p in params if p in read])
    passthrough = [name for name in outputs if name in known]  # a cut value read again later: an Identity
    for name in passthrough:
        graph.output.remove(next(o for o in graph.output if o.name == name))
    if not graph.output:
        return _Passing(None, passthrough)
    return _Passing(runtime.make_session(part, provider, threads, arena=False), passthrough)  # no arena: one per piece


class _Passing:
    """A piece's session (None when it computes nothing), and the outputs it passes through unchanged
    from its inputs (a value cut before one layer and still read after the next)."""

    def __init__(self, session, passthrough: list[str]):
        self.session, self.passthrough = session, set(passthrough)
        self.inputs = set() if session is None else {i.name for i in session.get_inputs()}

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        computed = [n for n in names if n not in self.passthrough]
        values = dict(zip(computed, self.session.run(computed, {k: v for k, v in feeds.items() if k in self.inputs})
                          if computed else []))
        return [values[n] if n in values else feeds[n] for n in names]
