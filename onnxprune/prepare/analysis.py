"""The analysis copy: small declared passes that make an export's weights findable, and undo.

Exporters store weights in forms the layer matchers cannot use as they are: Constant nodes
(paddle2onnx, older tf2onnx and caffe2), one initializer read by several nodes because equal tensors
were deduplicated (all-zero biases, all-one LayerNorm scales), tensors whose shapes inference leaves
unknown under dynamic sizes. Each pass below rewrites the analysis copy in place and returns what it
changed; ``AnalysisCopy.restore`` gives the pruned model its own form back: Constants stay Constants,
copies of a shared initializer that still equal it are merged into it again, declared shapes go.
The passes follow ``onnxprune.graph.passes`` (in place, a ``PassResult``), with a ``restore`` each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.graph.index import FLOAT_TYPES, subgraph_reads, tensor_dims, tensor_ranks, tensor_types
from onnxprune.graph.passes import BATCH, FreeBatch, PassResult, ReversiblePass, free_batch_copy
from onnxprune.prepare.shuffles import ChannelShuffles

COPY = "__onnxprune_copy"


class ConstantsToInitializers(ReversiblePass):
    """Constant nodes holding a float tensor of rank >= 1 become initializers of the same name (in place).

    ensures: no such Constant is left in the main graph; ``restored`` puts them back as Constants
    with the (possibly pruned) values."""

    def __init__(self) -> None:
        self.moved: list[str] = []

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        keep = []
        for node in graph.node:
            value = _constant_tensor(node)
            if value is None or value.data_type not in FLOAT_TYPES or len(value.dims) == 0:
                keep.append(node)
                continue
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            self.moved.append(tensor.name)
        if self.moved:
            del graph.node[:]
            graph.node.extend(keep)
        return PassResult(bool(self.moved), f"{len(self.moved)} Constant nodes read as initializers" if self.moved else "")

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        constants = []
        for name in self.moved:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = ""
            constants.append(helper.make_node("Constant", [], [name], name=f"{name}__constant", value=tensor))
        kept = [t for t in graph.initializer if t.name not in set(self.moved)]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


class UnshareInitializers(ReversiblePass):
    """A float initializer of rank >= 1 read by several nodes of the main graph gets its own copy per
    reader after the first (in place), so that pruning or compensating one layer changes no other.

    requires: the initializer is not also read inside a subgraph (then it stays shared, and the layer
    matchers name it); ensures: every such initializer has one reader; ``restore`` merges every copy
    that still equals the original back into it."""

    def __init__(self) -> None:
        self.copies: dict[str, str] = {}  # copy name -> original name

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        inner = set().union(*(subgraph_reads(node) for node in graph.node)) if len(graph.node) else set()
        outputs = {o.name for o in graph.output}
        readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in inits:
                    readers.setdefault(name, []).append((node, i))
        for name, uses in readers.items():
            tensor = inits[name]
            if len(uses) < 2 or name in inner or name in outputs or tensor.data_type not in FLOAT_TYPES or not len(tensor.dims):
                continue
            for k, (node, i) in enumerate(uses[1:], start=1):
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = f"{name}{COPY}{k}"
                graph.initializer.append(copy)
                node.input[i] = copy.name
                self.copies[copy.name] = name
        count = len(set(self.copies.values()))
        return PassResult(bool(self.copies), f"{count} shared initializers copied per reader" if count else "")

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        arrays = {t.name: t for t in graph.initializer}
        merged = set()
        for copy, original in self.copies.items():
            if copy in arrays and original in arrays and _same(arrays[copy], arrays[original]):
                for node in graph.node:
                    for i, name in enumerate(node.input):
                        if name == copy:
                            node.input[i] = original
                merged.add(copy)
        kept = [t for t in graph.initializer if t.name not in merged]
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


class FoldFixedInputs(ReversiblePass):
    """Graph inputs the data gives one value for (no batch axis: a scalar sample rate) become
    initializers holding that value (in place): the analysis sees them as the constants they are for
    this data. ``restore`` makes them inputs again, where they were."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = values
        self.inputs: list[tuple[int, onnx.ValueInfoProto]] = []  # (position, the input as it was)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        for index, vi in enumerate(graph.input):
            if vi.name in self.values:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(vi)
                self.inputs.append((index, copy))
        for _, vi in self.inputs:
            graph.input.remove(next(i for i in graph.input if i.name == vi.name))
            graph.initializer.append(numpy_helper.from_array(np.asarray(self.values[vi.name]), vi.name))
        names = ", ".join(repr(vi.name) for _, vi in self.inputs)
        return PassResult(bool(self.inputs), f"inputs without a batch axis fed as constants: {names}" if names else "")

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        names = {vi.name for _, vi in self.inputs}
        kept = [t for t in graph.initializer if t.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for index, vi in self.inputs:
            graph.input.insert(index, vi)


class BatchFirstInputs(ReversiblePass):
    """Inputs whose batch is not their first axis (a recurrent state (2, batch, 128)) are declared
    batch-first, and a Transpose gives the graph its own layout back (in place): the engines slice,
    pad and tile every input along its first axis. ``restore`` undoes it."""

    def __init__(self, axes: dict[str, int]):
        self.axes = axes
        self.moved: list[tuple[int, onnx.ValueInfoProto]] = []  # (position, the input as it was)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        transposes = []
        for index, vi in enumerate(graph.input):
            axis = self.axes.get(vi.name)
            if not axis:
                continue
            original = onnx.ValueInfoProto()
            original.CopyFrom(vi)
            self.moved.append((index, original))
            dims = list(vi.type.tensor_type.shape.dim)
            order = [axis] + [k for k in range(len(dims)) if k != axis]
            permuted = [onnx.TensorShapeProto.Dimension() for _ in dims]
            for new, old in zip(permuted, order):
                new.CopyFrom(dims[old])
            del vi.type.tensor_type.shape.dim[:]
            vi.type.tensor_type.shape.dim.extend(permuted)
            layout = f"{vi.name}__model_layout"
            _rename_reads(graph, vi.name, layout)
            perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(dims)))
            transposes.append(helper.make_node("Transpose", [vi.name], [layout], name=layout, perm=perm))
        nodes = transposes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        names = ", ".join(f"{vi.name!r} (axis {self.axes[vi.name]})" for _, vi in self.moved)
        return PassResult(bool(self.moved), f"batch moved first in {names}" if names else "")

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        layouts = {f"{vi.name}__model_layout": vi.name for _, vi in self.moved}
        kept = [node for node in graph.node if not (node.op_type == "Transpose" and node.output[0] in layouts)]
        del graph.node[:]
        graph.node.extend(kept)
        for layout, name in layouts.items():
            _rename_reads(graph, layout, name)
        for index, original in self.moved:
            graph.input[index].CopyFrom(original)


class FreeDeclaredBatch(ReversiblePass):
    """An export traced at a fixed batch (its inputs and outputs declare N, often 1) whose graph runs
    on more samples gets a free batch in the analysis copy (in place), so that every run of it --
    statistics, moments, refits, the fallback's judge -- takes the batches the data gives;
    ``restore`` declares N again. A graph that cannot run on N + 1 samples (a Reshape to the traced
    batch), or whose outputs do not grow by one sample along one axis when it does (a Reshape to
    (1, -1, C) merges the samples), keeps its declared batch.

    requires: inputs batch-first (after ``BatchFirstInputs``); ``feeds`` one sample per input."""

    def __init__(self, feeds: dict[str, np.ndarray], provider: str = "cpu"):
        self.feeds, self.provider = feeds, provider
        self.declared: list[tuple[str, int]] = []  # (input or output name, its declared batch)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        infos = [vi for vi in [*graph.input, *graph.output] if vi.name not in inits and vi.type.HasField("tensor_type")]
        fixed = {vi.name: vi.type.tensor_type.shape.dim[0].dim_value for vi in infos
                 if len(vi.type.tensor_type.shape.dim) and vi.type.tensor_type.shape.dim[0].dim_value >= 1}
        batch = {fixed[name] for name in self.feeds if name in fixed}
        if len(batch) != 1:
            return PassResult(False)
        traced = batch.pop()
        try:
            session = runtime.make_session(free_batch_copy(model), self.provider)
            outputs = [[np.shape(v) for v in session.run(None, {k: np.repeat(v[:1], n, axis=0) for k, v in self.feeds.items()})]
                       for n in (traced, traced + 1)]
        except runtime.RuntimeUnavailable:
            raise
        except Exception:  # noqa: BLE001 - the graph itself holds the traced batch
            return PassResult(False)
        if not all(_grows(a, b, traced) for a, b in zip(*outputs)):
            return PassResult(False)  # it runs on more, but merges the samples (a Reshape to (1, -1, C))
        self.declared = list(fixed.items())
        FreeBatch()(model)  # the intermediate shapes of the traced batch go too
        return PassResult(True, f"the declared batch {traced} freed (restored in the written model)")

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        infos = {vi.name: vi for vi in [*graph.input, *graph.output]}
        for name, size in self.declared:
            if name in infos and len(infos[name].type.tensor_type.shape.dim):
                dim = infos[name].type.tensor_type.shape.dim[0]
                dim.Clear()
                dim.dim_value = size


def _grows(a: tuple, b: tuple, traced: int) -> bool:
    """Whether an output of shape ``a`` at the traced batch has shape ``b`` at one sample more: one axis
    holds the samples, or none changed (an output that does not depend on them)."""
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and changed in ([], [(traced, traced + 1)])


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of tensor ``old`` in ``graph`` and its subgraphs (outer-scope references) reads ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for inner in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                if old not in {vi.name for vi in inner.input} | {t.name for t in inner.initializer}:
                    _rename_reads(inner, old, new)


class DeclareShapes(ReversiblePass):
    """Value infos for the main graph's float tensors whose rank shape inference leaves unknown, from
    runs on one and on two calibration samples (in place): a dim equal in both runs is declared as
    measured, one that is 1 then 2 is the batch (wherever it sits: attention exports move it to axis
    1), any other that changed stays unknown (a batch merged into it). onnxruntime trusts declared
    shapes (its Reshape fusion reads them), so none may claim more than both runs showed.
    ``restore`` removes them again."""

    def __init__(self, shapes: dict[str, list[int | str | None]]):
        self.shapes = shapes
        self.declared: list[str] = []

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        known = {vi.name for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]
                 if vi.type.tensor_type.HasField("shape")}
        types = tensor_types(model)
        for name, shape in self.shapes.items():
            if name in known or types.get(name) not in FLOAT_TYPES:
                continue
            model.graph.value_info.append(helper.make_tensor_value_info(name, types[name], shape))
            self.declared.append(name)
        return PassResult(bool(self.declared), f"{len(self.declared)} shapes declared from the data" if self.declared else "")

    def restore(self, model: onnx.ModelProto) -> None:
        declared = set(self.declared)
        kept = [vi for vi in model.graph.value_info if vi.name not in declared]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)


def batch_shape(one: tuple[int, ...], two: tuple[int, ...]) -> list[int | str | None] | None:
    """The shape to declare for a tensor measured as ``one`` at batch 1 and ``two`` at batch 2 (None
    when even the rank changed): see DeclareShapes."""
    if len(one) != len(two):
        return None
    return [a if a == b else (BATCH if (a, b) == (1, 2) else None) for a, b in zip(one, two)]


def unknown_rank_tensors(model: onnx.ModelProto) -> list[str]:
    """Float node outputs of the main graph whose rank shape inference cannot tell."""
    known = tensor_ranks(model)  # initializers included
    return [out for node in model.graph.node for out in node.output if out and out not in known]


def unknown_fold_inputs(model: onnx.ModelProto) -> list[str]:
    """Float tensors a Reshape turns into a Gemm's or MatMul's input whose last dims shape inference
    cannot tell (a legacy export computes the Reshape's target from Shape ops): measured, they say
    whether the Reshape folds tokens into the rows (``find.layers.folds_rows``)."""
    dims = tensor_dims(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        reshape = producer.get(node.input[0]) if node.op_type in ("Gemm", "MatMul") and node.input else None
        if reshape is not None and reshape.op_type == "Reshape":
            before = dims.get(reshape.input[0])
            if before is not None and len(before) >= 3 and None in before[1:]:
                found.append(reshape.input[0])
    return list(dict.fromkeys(found))


@dataclass
class AnalysisCopy:
    """The passes applied to a copy of a model, in order, and how to give a pruned copy its form back."""

    model: onnx.ModelProto
    passes: list[ReversiblePass] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, source: onnx.ModelProto) -> AnalysisCopy:
        """A copy of ``source`` with Constants read as initializers, shared initializers unshared and
        channel shuffles read as Gathers (``prepare.shuffles``)."""
        model = onnx.ModelProto()
        model.CopyFrom(source)
        copy = cls(model)
        for step in (ConstantsToInitializers(), UnshareInitializers(), ChannelShuffles()):
            copy.apply(step)
        return copy

    def apply(self, step: ReversiblePass) -> PassResult:
        result = step(self.model)
        if result.changed:
            self.passes.append(step)
            self.notes.append(result.note)
        return result

    def restore(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        """``pruned`` (a rewrite of this copy) in the source's own form: the passes undone, last first."""
        for step in reversed(self.passes):
            step.restore(pruned)
        return pruned


def declared_shapes_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu") -> DeclareShapes | None:
    """A DeclareShapes pass for the tensors of unknown rank, measured on the first sample of ``feeds``
    and on it twice (None when there are none, or onnxruntime cannot produce them)."""
    names = unknown_rank_tensors(model) + unknown_fold_inputs(model)
    if not names:
        return None
    try:
        runnable = free_batch_copy(model)
        one, two = ({k: np.concatenate([v[:1]] * n) for k, v in feeds.items()} for n in (1, 2))
        shapes = [[tuple(np.shape(v)) for v in runtime.run_tensors(runnable, f, names, provider)] for f in (one, two)]
    except Exception:  # noqa: BLE001 - the matchers then name the unknown ranks themselves
        return None
    declared = {n: batch_shape(a, b) for n, a, b in zip(names, *shapes)}
    return DeclareShapes({n: shape for n, shape in declared.items() if shape is not None})
