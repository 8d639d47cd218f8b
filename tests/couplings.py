"""Tiny graphs for the unit-group tests, written with onnx.helper the way the exporters write them
(torch's legacy exporter: Constant nodes and shapes computed from Shape; the dynamo exporter:
initializers, shared scalars; paddle2onnx and keras2onnx: biases reshaped at run time, Gemm-based
squeeze-excitation), and the check every coupling must pass: the shrunk model equals the dense
model reading the removed units as their constants (tests/unitref.py), passes onnx.checker's full
check and runs on onnxruntime."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from unitref import removal, replaced, replaced_all

from onnxprune import runtime
from onnxprune.edit.slicing import remove_units
from onnxprune.find.units import find_units

n = helper.make_node


class Graph:
    """Nodes and initializers of a graph being written; weights drawn from one seeded generator."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.count = 0

    def w(self, name, *shape, scale=0.5):
        self.inits.append(numpy_helper.from_array((self.rng.normal(size=shape) * scale).astype(np.float32), name))
        return name

    def const(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def constant_node(self, value, dtype=np.float32):
        """A Constant node (torch's legacy exporter), its output's name."""
        self.count += 1
        out = f"constant_{self.count}"
        self.nodes.append(n("Constant", [], [out], name=out, value=numpy_helper.from_array(np.asarray(value, dtype))))
        return out

    def add(self, op, inputs, name, output=None, **attrs):
        """A node whose output is named after it (or ``output``)."""
        self.nodes.append(n(op, inputs, [output or name], name=name, **attrs))
        return output or name

    def conv(self, x, name, cin, cout, k=1, pads=0, group=1, bias=True):
        inputs = [x, self.w(f"{name}.w", cout, cin // group, k, k)] + ([self.w(f"{name}.b", cout)] if bias else [])
        return self.add("Conv", inputs, name, kernel_shape=[k, k], pads=[pads] * 4, group=group)

    def model(self, x_shape, out, out_shape, opset=17, inputs=None):
        graph = helper.make_graph(self.nodes, "t", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def feeds(model, sizes=None, seed=1):
    """Random inputs: symbolic dims take ``sizes`` (by name, 3 for any other)."""
    rng = np.random.default_rng(seed)
    found = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else (sizes or {}).get(d.dim_param, 3)
                for d in vi.type.tensor_type.shape.dim]
        found[vi.name] = rng.normal(size=dims).astype(np.float32)
    return found


def shrinks_to_masked(model, name, inputs=None, seed=0):
    """Remove about half of group ``name``'s units (random constants in their place): the shrunk model
    equals the masked dense model to 1e-5, passes the full check and has fewer parameters; returns it."""
    rng = np.random.default_rng(seed)
    group = find_units(model).by_name()[name]
    removed, constants = removal(group, rng), rng.normal(size=group.units)
    shrunk = remove_units(model, {name: removed}, {name: constants})
    onnx.checker.check_model(shrunk, full_check=True)
    reference = replaced(model, group, removed, constants)
    for given in inputs or [feeds(model)]:
        want = runtime.make_session(reference).run(None, given)
        got = runtime.make_session(shrunk).run(None, given)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert sum(int(np.prod(t.dims)) for t in shrunk.graph.initializer) < \
        sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return shrunk


def all_at_once(model, inputs=None, seed=0):
    """Remove about half of every group's units in one rewrite: the masked model with every group replaced."""
    rng = np.random.default_rng(seed)
    groups = find_units(model).groups
    removed = {g.name: removal(g, rng) for g in groups}
    constants = {g.name: rng.normal(size=g.units) for g in groups}
    shrunk = remove_units(model, removed, constants)
    onnx.checker.check_model(shrunk, full_check=True)
    reference = replaced_all(model, groups, removed, constants)
    for given in inputs or [feeds(model)]:
        want = runtime.make_session(reference).run(None, given)
        for a, b in zip(runtime.make_session(shrunk).run(None, given), want):
            if np.asarray(a).dtype != object:  # skl2onnx's ZipMap: dicts of the probabilities compared
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    return shrunk


def consumers(model):
    return {g.name: [c.layer for c in g.consumers] for g in find_units(model).groups}


def reasons(model):
    return {r.node: r for r in find_units(model).rejected}
