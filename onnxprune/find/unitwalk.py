"""The walk from a producer layer to every layer that reads its units (see ``units``).

Forward from the producer's pre-activation through per-unit nodes (``unitsteps``) to the consumer
layers; at a node that combines the units with another computed tensor of the same channels (a
residual Add, SiLU's ``x * sigmoid(x)``, GELU's ``x * (1 + erf(x / sqrt 2)) / 2``, a squeeze-
excitation gate ``x * sigmoid(fc2(relu(fc1(pool(x)))))``, SwiGLU's ``silu(gate) * up``) the walk
goes backward from that tensor to every producer writing into the same channels (all of them share
one mask: a residual stream, the SE's last layer, the gated FFN's up projection) and forward again
from every tensor it reaches. A tensor broadcast over the channels may join the units when it does
not depend on them (an attention mask); one computed from all of them (a normalization written
out) cannot. The walk does not stop at the first obstacle: it collects them all, and names an
unavoidable one (a graph output, a normalization over the channels) before any other.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.find.layers import BORDER, Layer, Skipped
from onnxprune.find.unitgroups import Consumer, Cut, Unavoidable, UnitGroup, in_axis, out_axis, stored_axis
from onnxprune.find.unitlayout import gathered_from
from onnxprune.find.unitplace import BINARY, DATA_INPUTS, JOINS, REDUCE, UNARY, Context, Divide, Walk, node_axes
from onnxprune.find.unitsteps import step
from onnxprune.graph.index import Rejection, attributes


class _Search:
    """One walk's work lists and findings."""

    def __init__(self, ctx: Context, start: Layer, part: tuple[int, int, int] | None = None):
        self.ctx, self.start, self.part = ctx, start, part  # (first row, end, index) of a part of its rows
        self.walk = Walk(start, part[:2] if part else None)
        self.producers: list[Layer] = []
        self.written: set[tuple[str, int]] = {(start.name, self.walk.offset)}  # (producer, offset of the units)
        self.consumers: dict[tuple[str, int], Consumer] = {}  # a Concat may give a layer the units at several offsets
        self.seen_tensors: set[tuple[str, tuple]] = set()
        self.entered: set[tuple[str, str, tuple]] = set()  # (node, the input the units entered it by, their place)
        self.forward: list[tuple[str, tuple]] = [(start.preact, self.walk.place)]
        self.backward: list[tuple[str, tuple]] = []
        self.stops: list[Rejection] = []

    def run(self) -> None:
        while self.forward or self.backward:
            if self.backward:
                tensor, place = self.backward.pop()
                self._attempt(self._back, tensor, place)
                continue
            tensor, place = self.forward.pop()
            if (tensor, place) in self.seen_tensors:
                continue
            self.seen_tensors.add((tensor, place))
            rank = self.ctx.rank(tensor)
            if rank is not None:
                self.walk.places.setdefault(tensor, (rank, rank - place[0]))
            if not self._attempt(self._reached, tensor):
                continue
            for node in self.ctx.g.consumers[tensor]:
                self._attempt(self._enter, node, tensor, place)

    def _attempt(self, action, *args) -> bool:
        try:
            action(*args)
            return True
        except Rejection as stop:
            self.stops.append(stop)
            return False

    def _reached(self, tensor: str) -> None:
        g = self.ctx.g
        if tensor in g.outputs:
            raise Unavoidable(f"its units reach the graph output {tensor!r}")
        if tensor in g.subgraph_readers:
            raise Rejection(g.shared_reason(tensor, "the units' tensor"))
        if not g.consumers[tensor]:
            raise Rejection(f"tensor {tensor!r} is not read by any node")

    def _computed(self, node: onnx.NodeProto) -> list[str]:
        """The inputs of ``node`` that carry data computed from the model's inputs (not its parameters)."""
        if node.name.endswith(BORDER):
            return [node.input[0]]  # a folded border map: per channel (computed at run time or not)
        data = node.input[:DATA_INPUTS.get(node.op_type, len(node.input))]
        return [i for i in data if i and self.ctx.constants.value(i) is None]

    def _visit(self, node: onnx.NodeProto, tensor: str, place: tuple) -> bool:
        """Mark ``node`` entered by ``tensor`` with the units at ``place``; False when it was before (a
        node is walked once per input and place the units reach it by: a Concat of the same units
        twice has them at two offsets, a tensor may hold them twice)."""
        key = (node.name, tensor, place)
        if key in self.entered:
            return False
        self.entered.add(key)
        self.walk.path.append(node.name)
        return True

    def _enter(self, node: onnx.NodeProto, tensor: str, place: tuple) -> None:
        ctx, walk = self.ctx, self.walk
        walk.place = place  # as the tensor has the units (a sibling's step may have moved them)
        layer = ctx.by_node.get(node.name)
        if layer is not None and layer.input == tensor and not _depthwise(layer, walk):
            if (layer.name, walk.offset) not in self.consumers:
                self.consumers[layer.name, walk.offset] = _add_consumer(walk, layer, tensor)
            return
        if not self._visit(node, tensor, place):
            return
        computed = self._computed(node)
        if len(computed) > 1 and node.op_type != "Concat":
            if node.op_type not in JOINS:
                raise Rejection(f"{node.op_type} {node.name!r} reads the units together with another computed tensor")
            if walk.block != 1:
                raise Rejection(f"{node.op_type} {node.name!r} joins flattened units")
            self._join(node, [i for i in computed if i != tensor], tensor, place)
            self.forward.append((node.output[0], place))
            return
        if layer is not None and node.op_type != "Conv":
            raise Rejection(f"{layer.op} {layer.name!r} reads the units in an unsupported position")
        for out in step(ctx, walk, node, tensor):
            self.forward.append((out, walk.place))
        self.backward.extend((t, walk.place) for t in walk.carried)
        walk.carried.clear()

    def _join(self, node: onnx.NodeProto, others: list[str], tensor: str, place: tuple) -> None:
        """The other computed inputs of a join: walked back when they carry the units; passed when they
        are broadcast over the channels and do not depend on them."""
        for other in others:
            if _carries(self.ctx, self.walk, other):
                self.backward.append((other, place))
                continue
            reduction = _normalization(self.ctx, self.walk, other)
            if reduction is not None:
                raise Unavoidable(f"the residual stream of {reduction.op_type} {reduction.name!r}: a normalization "
                                  "over the channels written out, so removing one changes all the others")
            if _depends(self.ctx, other, {tensor, self.start.preact}):
                raise Rejection(f"{node.op_type} {node.name!r} combines the units with {other!r}, which is computed from "
                           "all of their channels")

    def _back(self, tensor: str, place: tuple) -> None:
        """From a tensor that carries the units back to the producers writing them."""
        ctx, walk = self.ctx, self.walk
        layer = ctx.by_preact.get(tensor)
        if layer is not None and not _depthwise(layer, walk):
            if (layer.name, place[2]) not in self.written:
                walk.place = place
                _add_producer(ctx, walk, self.producers, layer)
                self.written.add((layer.name, place[2]))
            self.forward.append((tensor, place))
            return
        node = ctx.g.producers.get(tensor)
        if node is None:
            raise Rejection(f"the units' channels come from the graph input {tensor!r}")
        computed = self._computed(node)
        self.forward.append((tensor, place))
        if node.op_type == "Concat":
            self._back_concat(node, computed, place)
        elif node.op_type in JOINS and len(computed) > 1:
            if not self._visit(node, tensor, place):
                return
            walk.place = place
            if walk.block != 1:
                raise Rejection(f"{node.op_type} {node.name!r} joins flattened units")
            carried = [i for i in computed if _carries(ctx, walk, i)]
            self.backward.extend((i, place) for i in carried)
            self._join(node, [i for i in computed if i not in carried], carried[0] if carried else tensor, place)
        elif len(computed) == 1:
            before = _place_before(ctx, walk, node, computed[0], tensor, place)
            if self._visit(node, computed[0], before):  # the step's cuts and edits, once per input and place
                walk.place = before
                step(ctx, walk, node, computed[0])
                self.backward.append((computed[0], before))
        else:
            raise Rejection(f"{node.op_type} {node.name!r} writes the units from {len(computed)} computed tensors")

    def _back_concat(self, node: onnx.NodeProto, computed: list[str], place: tuple) -> None:
        """Back through a Concat: along the units' axis to the input that holds them (a Concat that
        joins them from several inputs divides them), along another axis to every input."""
        ctx, walk = self.ctx, self.walk
        rank = ctx.rank(node.output[0])
        if rank is None:
            raise Rejection(f"Concat {node.name!r} of unknown rank")
        if int(attributes(node).get("axis", 0)) % rank != rank - place[0]:
            source = computed[0]
            if self._visit(node, source, place):
                walk.place = place
                step(ctx, walk, node, source)
                self.backward.extend((t, place) for t in [source, *walk.carried])
                walk.carried.clear()
            return
        walk.place = place
        start, low, high = 0, walk.offset, walk.end
        for name in node.input:
            shape = ctx.shapes.get(name)
            if shape is None or shape[rank - place[0]] is None:
                raise Rejection(f"Concat {node.name!r} input {name!r} has a channel count shape inference cannot tell")
            size = int(shape[rank - place[0]])
            if start <= low and high <= start + size:
                if name not in computed:
                    raise Rejection(f"Concat {node.name!r} writes the units from the constant {name!r}")
                before = (place[0], place[1], low - start, size, place[4])
                if self._visit(node, name, before):
                    self.backward.append((name, before))
                return
            if low < start + size < high:
                raise Divide(f"Concat {node.name!r} writes the units from several inputs", [walk.index_at(start + size)])
            start += size
        raise Rejection(f"Concat {node.name!r} does not hold the units where they are")

    @property
    def name(self) -> str:
        return self.start.name if self.part is None else f"{self.start.name}[{self.part[2]}]"

    def result(self) -> UnitGroup | Skipped:
        start, walk = self.start, self.walk
        if self.stops:
            chosen = next((s for s in self.stops if s.unavoidable), self.stops[0])
            return Skipped(self.name, start.op, str(chosen), chosen.unavoidable)
        position = {node.name: i for i, node in enumerate(self.ctx.g.model.graph.node)}
        readers = sorted(self.consumers.values(), key=lambda c: (position[self.ctx.layers[c.layer].node], c.offset))
        writers = sorted({p.name: p for p in self.producers}.values(), key=lambda p: position[p.node])
        return UnitGroup(name=self.name, producers=tuple(p.name for p in writers), units=walk.units,
                         tensor=readers[0].tensor, consumers=tuple(readers), cuts=tuple(dict.fromkeys(walk.cuts)),
                         group_attributes=tuple(dict.fromkeys(walk.groups)), reshapes=tuple(walk.reshapes),
                         renumbers=tuple(dict.fromkeys(walk.renumbers)),
                         path=tuple(dict.fromkeys(walk.path)), lanes=walk.lanes)


def match_group(ctx: Context, start: Layer) -> list[UnitGroup | Skipped]:
    """The unit groups of ``start``'s output rows, or why there are none: one group, or one per part
    when a Split or Slice divides them (part k is named ``layer[k]``; a part that an earlier part's
    group already holds, as an STFT's imaginary half with its real half, is not walked again)."""
    bounds = [0, start.out_features]
    while True:
        results: list[UnitGroup | Skipped] = []
        at: set[int] = set()
        covered: set[int] = set()
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if a in covered:
                continue
            search = _Search(ctx, start, (a, b, k) if len(bounds) > 2 else None)
            try:
                _add_producer(ctx, search.walk, search.producers, start)
            except Rejection as stop:
                results.append(Skipped(search.name, start.op, str(stop), stop.unavoidable))
                continue
            search.run()
            if not search.stops and not search.consumers:
                search.stops.append(Rejection("no layer reads its units"))
            divides = [s for s in search.stops if isinstance(s, Divide)]
            if divides and not any(s.unavoidable for s in search.stops):
                at |= {a + x for d in divides for x in d.at if 0 < x < b - a}
                continue
            results.append(search.result())
            if not search.stops:
                covered |= {offset for name, offset in search.written if name == start.name}
        if not at:
            if start.out_features == 1:  # whatever stopped the walk, the one unit can only go with the layer
                return [Skipped(r.node, r.op, f"it has one output unit, which cannot go without the layer ({r.reason})",
                                 True) if isinstance(r, Skipped) else r for r in results]
            return results
        bounds = sorted(set(bounds) | at)


def _carries(ctx: Context, walk: Walk, name: str) -> bool:
    """Whether a join's operand has the units' channels (not broadcast over them)."""
    shape = ctx.shapes.get(name)
    if shape is None:
        return True  # unknown: the backward walk finds out
    index = len(shape) - walk.axis_from_end
    return index >= 0 and (shape[index] != 1 or walk.width == 1)


def _normalization(ctx: Context, walk: Walk, name: str) -> onnx.NodeProto | None:
    """The reduction over the channels that ``name`` is an elementwise function of (an RMS or layer
    norm written out: ``x * rsqrt(mean(x^2))``, ``x - mean(x)``), if it is one."""
    node = ctx.g.producers.get(name)
    while node is not None:
        computed = [i for i in node.input if i and ctx.constants.value(i) is None]
        if node.op_type in REDUCE:
            rank = ctx.rank(node.input[0])
            if rank is None:
                return node
            try:
                axes = node_axes(ctx, node, rank)
            except Rejection:
                return node
            return node if axes is None or (rank - walk.axis_from_end) in axes else None
        if len(computed) != 1 or node.op_type not in UNARY | BINARY:
            return None
        node = ctx.g.producers.get(computed[0])
    return None


def _depends(ctx: Context, name: str, targets: set[str]) -> bool:
    """Whether tensor ``name`` is computed from any of ``targets`` (a tensor's shape does not count)."""
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current in targets:
            return True
        if current in seen:
            continue
        seen.add(current)
        node = ctx.g.producers.get(current)
        if node is not None and node.op_type not in ("Shape", "Size"):
            stack.extend(i for i in node.input if i)
    return False


def _place_before(ctx: Context, walk: Walk, node: onnx.NodeProto, source: str, tensor: str, place: tuple) -> tuple:
    """The units' place in ``source`` such that ``node`` moves them to ``place`` in ``tensor``."""
    rank = ctx.rank(source)
    candidates = [place] + [(axis, 1, *place[2:]) for axis in range(1, (rank or 0) + 1) if axis != place[0]]
    shape = ctx.shapes.get(source)
    if node.op_type in ("Split", "Slice") and shape is not None and rank is not None and shape[rank - place[0]]:
        width = int(shape[rank - place[0]])  # the units at each offset they could have in the Split's or Slice's input
        candidates += [(place[0], place[1], offset, width, place[4]) for offset in range(width - place[3] + place[2] + 1)]
    if node.op_type == "Gather":
        candidates += gathered_from(ctx, walk, node, place)
    cuts, reshapes, renumbers = list(walk.cuts), list(walk.reshapes), list(walk.renumbers)
    groups, path = list(walk.groups), list(walk.path)
    found = None
    for candidate in candidates:
        walk.place = candidate
        try:
            outs = step(ctx, walk, node, source)
        except Rejection:
            outs = []
        moved = walk.place
        walk.cuts, walk.reshapes, walk.renumbers = list(cuts), list(reshapes), list(renumbers)
        walk.groups, walk.path = list(groups), list(path)
        walk.carried.clear()
        if tensor in outs and moved == place:
            found = candidate
            break
    walk.place = place
    if found is not None:
        return found
    raise Rejection(f"{node.op_type} {node.name!r} cannot be walked back to the producers")


def _add_producer(ctx: Context, walk: Walk, producers: list, layer: Layer) -> None:
    """A layer writing the units (all its rows, or some of them where its output is split): its rows
    (and bias) are cut."""
    g = ctx.g
    if any(s.op == "DequantizeLinear" for s in layer.weight_path):
        raise Rejection(f"{layer.name!r} has quantized weights, which are not sliced")
    if layer.op == "Conv" and layer.geometry.groups != 1:
        if layer.geometry.groups == layer.out_features:
            raise Rejection(f"depthwise Conv {layer.name!r}: its channels follow its input's")
        walk.set_lanes(layer.geometry.groups, layer.name)
    if layer.out_features != walk.width or walk.block != 1:
        raise Rejection(f"{layer.name!r} writes {layer.out_features} channels into a group of {walk.units}")
    if layer.op == "Conv" and layer.geometry.groups != 1 and walk.concatenated:
        raise Rejection(f"grouped Conv {layer.name!r} writes some of its channels into the group")
    producers.append(layer)
    span = walk.span if walk.concatenated else {}
    walk.cuts.append(Cut(layer.weight, stored_axis(layer, out_axis(layer)), **span))
    bias = g.constant(layer.bias) if layer.bias is not None else None
    # a BatchNormalization holding the bias is sliced by its own step, its bias included
    if (layer.bias is not None and bias is not None and bias.size > 1
            and not (layer.bias_node and _is_batchnorm(g.nodes.get(layer.bias_node)))):
        from_end = (len(layer.weight_shape) - 1 if layer.op == "Conv" else 1) if layer.bias_node else 1
        walk.cuts.append(Cut(layer.bias, bias.ndim - from_end, **span))


def _add_consumer(walk: Walk, layer: Layer, tensor: str) -> Consumer:
    """A layer reading the units: its columns are cut."""
    block = walk.block
    groups = layer.geometry.groups if layer.op == "Conv" else 1
    if groups != 1:
        walk.set_lanes(groups, layer.name)
    if any(s.op == "DequantizeLinear" for s in layer.weight_path):
        raise Rejection(f"consumer {layer.name!r} has quantized weights")
    if layer.op == "Conv" and block != 1:
        raise Rejection(f"Conv {layer.name!r} reads flattened units")
    if walk.axis_from_end != (len(layer.weight_shape) - 1 if layer.op == "Conv" else 1):
        raise Rejection(f"{layer.op} {layer.name!r} reads the units along another axis than its input features")
    per = int(np.prod(layer.weight_shape[2:])) if layer.op == "Conv" else block
    if layer.in_features * groups != walk.width * per:
        raise Rejection(f"consumer {layer.name!r} has {layer.in_features * groups} inputs, not {walk.width} x {per}")
    if groups != 1 and (walk.concatenated or any(s.op == "Transpose" for s in layer.weight_path)):
        raise Rejection(f"grouped Conv {layer.name!r} with a transposed weight or after a Concat")
    walk.cuts.append(Cut(layer.weight, stored_axis(layer, in_axis(layer)), block if layer.op != "Conv" else 1, groups,
                         **walk.span))
    return Consumer(layer.name, per, tensor, **walk.span)


def _depthwise(layer: Layer, walk: Walk) -> bool:
    """A depthwise Conv of the channels the units are among: its channels follow theirs."""
    return layer.op == "Conv" and layer.geometry.groups == walk.width == layer.out_features and walk.width > 1


def _is_batchnorm(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "BatchNormalization"
