"""Edits of a graph's constants and nodes that slicing units needs besides the cuts: constants read
and written wherever they are held (initializers or Constant nodes), given to one reader when
others share them; shape entries that follow the units; Gathers that narrow a computed tensor to
the surviving units; graph inputs that declare the shapes of the initializers they carry."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.find.unitgroups import Select, ShapeEdit
from onnxprune.graph.index import default_opset
from onnxprune.graph.values import constant_node_value


class Store:
    """The constants of a model by name, held as initializers or as Constant nodes, read and written alike."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and len(n.output) == 1}

    def get(self, name: str) -> np.ndarray:
        if name not in self.inits and name not in self.nodes:
            self._materialize(name)
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        value = constant_node_value(self.nodes[name])
        if value is None:
            raise ValueError(f"Constant {name!r} holds no tensor")
        return value

    def _materialize(self, name: str) -> None:
        """An Identity chain's output of a shared constant becomes a constant of its own (the Identity goes)."""
        producers = {out: n for n in self.graph.node for out in n.output}
        node, source = producers.get(name), name
        while node is not None and node.op_type == "Identity":
            source = node.input[0]
            if source in self.inits or source in self.nodes:
                break
            node = producers.get(source)
        if node is None or node.op_type != "Identity":
            raise KeyError(f"{name!r} is neither a constant nor an Identity of one")
        self.graph.node.remove(producers[name])
        self.graph.initializer.append(numpy_helper.from_array(self.get(source), name))
        self.inits[name] = self.graph.initializer[-1]

    def set(self, name: str, value: np.ndarray) -> None:
        if name not in self.inits and name not in self.nodes:
            self._materialize(name)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
            return
        node = self.nodes[name]
        tensor.name = ""
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", tensor))

    def own(self, name: str, reader: onnx.NodeProto, slot: int) -> str:
        """``name``, or a copy of it that ``reader`` alone reads at input ``slot`` when others read it too."""
        readers = sum(list(n.input).count(name) for n in self.graph.node) + sum(o.name == name for o in self.graph.output)
        if readers == 1:
            return name
        copy = f"{name}__{reader.name}_{slot}"
        while copy in self.inits or copy in self.nodes:
            copy += "_"
        self.graph.initializer.append(numpy_helper.from_array(self.get(name), copy))
        self.inits[copy] = self.graph.initializer[-1]
        reader.input[slot] = copy
        return copy


def edit_shape(model: onnx.ModelProto, store: Store, edit: ShapeEdit, removed: int) -> None:
    """A shape entry follows the units: shrunk by ``removed`` x its entries per unit, or set to -1."""
    nodes = {n.name: n for n in model.graph.node}
    reader = nodes[edit.reader]
    if edit.tensor is not None:  # what the reader reads now: an earlier edit may have given it a copy
        name = store.own(reader.input[edit.slot], reader, edit.slot)
        value = store.get(name).copy()
        value.reshape(-1)[edit.index] -= removed * edit.per_unit
        store.set(name, value)
        return
    pin = f"{reader.name}__onnxprune_pin{edit.index}"
    if pin in nodes:  # another group's edit of the same entry in this rewrite
        if edit.value is not None:
            store.set(f"{pin}__entry", store.get(f"{pin}__entry") - removed * edit.per_unit)
        return
    opset = default_opset(model, 0)
    if opset < 10:
        raise ValueError(f"Reshape {reader.name!r}: its shape is computed and opset {opset} has no Slice with inputs")
    # the shape with entry ``index`` replaced: Concat(shape[:index], [entry], shape[index + 1:]), which shape
    # inference still reads through
    entry = -1 if edit.value is None else edit.value - removed * edit.per_unit
    bounds = {"before": 0, "at": edit.index, "after": edit.index + 1, "end": 1 << 62, "entry": entry}
    for suffix, bound in bounds.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray([bound], np.int64), f"{pin}__{suffix}"))
    shape, position = reader.input[1], list(model.graph.node).index(reader)
    nodes_in = [helper.make_node("Slice", [shape, f"{pin}__before", f"{pin}__at"], [f"{pin}__head"], name=f"{pin}__head"),
                helper.make_node("Slice", [shape, f"{pin}__after", f"{pin}__end"], [f"{pin}__tail"], name=f"{pin}__tail"),
                helper.make_node("Concat", [f"{pin}__head", f"{pin}__entry", f"{pin}__tail"], [f"{pin}__shape"],
                                 name=pin, axis=0)]
    for k, node in enumerate(nodes_in):
        model.graph.node.insert(position + k, node)
    reader.input[1] = f"{pin}__shape"


def select_units(model: onnx.ModelProto, select: Select, kept: np.ndarray) -> None:
    """Node ``select.node`` reads only the kept units of its input: a Gather in front, narrowed later."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    reader = nodes[select.node]
    name = f"{reader.name}__onnxprune_select{select.slot}"
    gather = nodes.get(name)
    indices = next((t for t in graph.initializer if t.name == f"{name}__indices"), None)
    if gather is not None and indices is not None and reader.input[select.slot] == gather.output[0]:
        indices.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(indices)[kept], indices.name))
        return
    graph.initializer.append(numpy_helper.from_array(np.asarray(kept, np.int64), f"{name}__indices"))
    position = list(graph.node).index(reader)
    graph.node.insert(position, helper.make_node("Gather", [reader.input[select.slot], f"{name}__indices"], [f"{name}__out"],
                                                 name=name, axis=select.axis))
    reader.input[select.slot] = f"{name}__out"


def declare_inputs(model: onnx.ModelProto) -> None:
    """Initializers that are also graph inputs (exported with their weights as inputs) declare their new shapes."""
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits and vi.type.tensor_type.HasField("shape"):
            dims = list(inits[vi.name].dims)
            shape = vi.type.tensor_type.shape
            if len(shape.dim) == len(dims):
                for dim, size in zip(shape.dim, dims):
                    dim.Clear()
                    dim.dim_value = int(size)
