"""The ``adjoint`` engine: onnx-ad's reverse-mode derivative graph, run by any onnxruntime build.

onnx-ad turns the instrumented copy into its vector-Jacobian-product model: the original inputs,
one seed input shaped like the protected output with a trailing seed axis, and one derivative
output per offset, shaped like the pre-activation with the same trailing axis. The forward pass
runs once per sample whatever the number of seeds (K one-hot seeds: the exact Jacobian rows; P
Rademacher seeds: an unbiased estimate of G). For layers whose weight is used once, the graph also
reduces G = sum over seeds of the squared derivative, so that only (batch, out) leaves the session.
The graph is plain ONNX: CPUExecutionProvider, CUDAExecutionProvider, any Python.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.derivatives.engines.base import EngineFailure, rademacher
from onnxprune.derivatives.engines.reverse import origin, reverse_graph
from onnxprune.derivatives.instrument import exposed, instrument, offset_name
from onnxprune.errors import Limitation
from onnxprune.find.layers import Layer, by_position, folded_preacts, sample_major
from onnxprune.graph.index import subgraph_reads, tensor_types
from onnxprune.graph.passes import free_batch_copy, needed_nodes
from onnxprune.prepare.shapes import tensor_shapes

MIN_OPSET = 16  # onnx-ad needs ScatterND with reduction (16) for MaxPool, Softmax-13, ReduceSum's axes input (13)
SQUARES = "onnxprune__G__"
LOSS = "onnxprune__loss"
ONE_HOT = "onnxprune__one_hot"


class _AdjointModel:
    """Instrumented copy -> reverse-mode graph -> session, built on the first batch and rebuilt when
    the per-sample shapes change or a larger batch comes.

    onnx-ad's Conv, pooling and Slice rules need every dimension declared, the batch included, so
    the graph is built for the first batch's size; a smaller batch (the last one) is padded by
    repeating its samples and the padded rows are dropped from every result."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], output: str, provider: str = "cpu",
                 threads: int | None = None):
        self.model, self.layers, self.output = model, list(layers), output
        self.provider, self.threads = provider, threads
        graph_inputs = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
        self.z_outputs = sorted({layer.input for layer in self.layers} - graph_inputs)
        self.session: Any = None
        self.prefix: Any = None
        self.prefix_outputs: list[str] = []
        self._signature: tuple | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.batch = 0

    def _head(self, m: onnx.ModelProto, elem: int) -> str:
        """Add what is seeded on top of the instrumented copy ``m``; return its name."""
        raise NotImplementedError

    def _build(self, feeds: dict[str, np.ndarray]) -> None:
        signature = tuple(sorted((k, v.shape[1:]) for k, v in feeds.items()))
        n = len(next(iter(feeds.values())))
        if signature == self._signature and n <= self.batch:
            return
        names = list(feeds) + [layer.preact for layer in self.layers] + [self.output]
        self.shapes = tensor_shapes(self.model, names, feeds, self.provider, folded_preacts(self.layers))
        m, elem = instrument(self.model, self.layers, self.output, [self.output] + self.z_outputs, self.shapes,
                             MIN_OPSET)
        self.batch = n
        m.ir_version = max(m.ir_version, 8)  # IR 8 goes with opset 16; below IR 4 onnx-ad's constants would need to be inputs
        _fix_batch(m, n)
        seeded = self._head(m, elem)
        offsets = [offset_name(layer) for layer in self.layers]
        try:
            m = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is a help, not a requirement; onnx-ad says what it misses
            pass
        self._declare_unknown(m, feeds)
        try:  # the part the offsets reach; when onnx-ad refuses it (a cut made a bound a graph input), the whole
            grad = reverse_graph(self._split_prefix(m, offsets), offsets, seeded)
        except EngineFailure:
            self.prefix = None
            grad = reverse_graph(m, offsets, seeded)
        self.seed_name = grad.graph.input[-1].name
        derivatives = [vi.name for vi in grad.graph.output[-len(offsets):]]
        self.rows_of = dict(zip((layer.name for layer in self.layers), derivatives))
        self._reduce_squares(grad, elem)
        _drop_dead_nodes(grad)
        self.dtype = helper.tensor_dtype_to_np_dtype(elem)
        try:
            self.session = runtime.proto_session(grad, self.provider, self.threads, arena=False)
        except runtime.RuntimeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
            raise EngineFailure(f"onnxruntime cannot load the derivative graph: {origin(self.model, exc)}") from None
        self.inputs_of = {i.name for i in self.session.get_inputs()}
        self._signature = signature
        self._seeds: dict[str, np.ndarray] = {}
        self._zeros: dict[str, np.ndarray] = {}

    def _split_prefix(self, m: onnx.ModelProto, offsets: list[str]) -> onnx.ModelProto:
        """Cut off the nodes no offset reaches (everything before the first layer: a recurrent front
        end, an If on a sample rate, the embedding): a plain forward session runs them, and onnx-ad
        only sees the part it differentiates. Returns that part; sets ``self.prefix``."""
        graph = m.graph
        tainted = set(offsets)
        late = []
        for node in graph.node:
            if tainted.intersection(node.input) or tainted.intersection(subgraph_reads(node)):
                tainted.update(node.output)
                late.append(node)
        early = [node for node in graph.node if not tainted.intersection(node.output)]
        self.prefix, self.prefix_outputs = None, []
        if all(_plain(node) for node in early):  # onnx-ad reads them as they are: one session, not two
            return m
        inputs = {vi.name for vi in graph.input}
        constant = {t.name for t in graph.initializer}
        for node in early:  # computed from constants alone (axes, shapes of weights): copied, never cut
            if all(not name or name in constant for name in node.input) and not inputs.intersection(subgraph_reads(node)):
                constant.update(node.output)
        folded = [node for node in early if constant.issuperset(o for o in node.output if o)]
        late = [node for node in folded if not tainted.intersection(node.output)] + late
        produced_early = {out for node in early for out in node.output} - constant
        needed = {name for node in late for name in [*node.input, *subgraph_reads(node)]}
        outputs = {vi.name for vi in graph.output}
        frontier = sorted(name for name in produced_early if name in needed or name in outputs)
        if not early or not frontier:
            return m
        info = {vi.name: vi for vi in [*graph.value_info, *graph.output]}
        if any(name not in info or not info[name].type.tensor_type.HasField("shape") for name in frontier):
            return m  # a cut tensor without a declared shape: differentiate the whole graph
        prefix, rest = (onnx.ModelProto(), onnx.ModelProto())
        for part, nodes, ins, outs in ((prefix, early, [vi for vi in graph.input if vi.name not in tainted],
                                        [info[n] for n in frontier]),
                                       (rest, late, [vi for vi in graph.input] + [info[n] for n in frontier
                                                                                   if n not in outputs],
                                        [vi for vi in graph.output if vi.name not in produced_early])):
            part.CopyFrom(m)
            used = {name for node in nodes for name in [*node.input, *subgraph_reads(node)]}
            part.graph.ClearField("node")
            part.graph.node.extend(nodes)
            kept = [t for t in m.graph.initializer if t.name in used]
            part.graph.ClearField("initializer")
            part.graph.initializer.extend(kept)
            part.graph.ClearField("input")
            part.graph.input.extend(vi for vi in ins if vi.name in used or vi.name in tainted)
            part.graph.ClearField("output")
            part.graph.output.extend(outs)
        try:
            self.prefix = runtime.proto_session(prefix, self.provider, self.threads, arena=False)
        except Exception:  # noqa: BLE001 - the whole graph then goes to onnx-ad, as before
            return m
        self.prefix_outputs = frontier
        self.prefix_inputs = {i.name for i in self.prefix.get_inputs()}
        return rest

    def _declare_unknown(self, m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        """Shapes inference leaves unknown or symbolic (onnx-ad needs every differentiated value's rank,
        and a Conv's input shape in numbers: ShuffleNet's channel shuffle Reshapes hide them), measured
        on the batch the graph is built for (whole shapes: a tensor may hold its batch on another axis,
        as a sequence-first transformer's do)."""
        known = {vi.name for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]  # every dim a number
                 if vi.type.tensor_type.HasField("shape")
                 and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)} | {t.name for t in m.graph.initializer}
        original = {out for node in self.model.graph.node for out in node.output if out}
        missing = [out for node in m.graph.node for out in node.output if out and out not in known and out in original]
        if not missing:
            return
        try:
            values = runtime.run_tensors(free_batch_copy(self.model), feeds, missing, self.provider)
        except Exception:  # noqa: BLE001 - onnx-ad will name what it still misses
            return
        shapes = {name: tuple(value.shape) for name, value in zip(missing, values)}
        types = tensor_types(self.model)
        shapeless = [vi for vi in m.graph.value_info if vi.name in shapes]  # typed but without a shape in numbers
        for vi in shapeless:
            m.graph.value_info.remove(vi)
        for name, shape in shapes.items():
            if name in types:
                m.graph.value_info.append(helper.make_tensor_value_info(name, types[name], list(shape)))
        for vi in m.graph.output:  # the exposed copies of those tensors
            source = vi.name[: -len("__onnxprune_z")] if vi.name.endswith("__onnxprune_z") else None
            if source in shapes and not vi.type.tensor_type.HasField("shape"):
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(shapes[source])))

    def _reduce_squares(self, grad: onnx.ModelProto, elem: int) -> None:
        """Outputs G = sum over the seed axis of the squared derivative, for single-use layers."""
        axis = f"{SQUARES}axis"  # a Constant, not an initializer: IR < 4 models need initializers declared as inputs
        grad.graph.node.append(helper.make_node("Constant", [], [axis], name=axis,
                                                value=numpy_helper.from_array(np.array([-1], np.int64))))
        for layer in self.layers:
            if layer.shared:
                continue
            rows, name = self.rows_of[layer.name], SQUARES + layer.name
            grad.graph.node.extend([
                helper.make_node("Mul", [rows, rows], [f"{name}__sq"], name=f"{name}__sq"),
                helper.make_node("ReduceSum", [f"{name}__sq", axis], [name], keepdims=0, name=f"{name}__sum")])
            grad.graph.output.append(helper.make_tensor_value_info(name, elem, None))

    def _cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Half-float feeds become float32 for the float32 copy."""
        return {k: v.astype(np.float32) if v.dtype == np.float16 or str(v.dtype) == "bfloat16" else v
                for k, v in feeds.items()}

    def _run(self, feeds: dict[str, np.ndarray], seed: np.ndarray, fetch: list[str], extra=None) -> list[np.ndarray]:
        """The fetched tensors and the layer inputs for ``feeds`` (padded to the graph's batch, and the
        padding dropped again); ``seed`` and ``extra`` are already of the graph's batch size."""
        n = len(next(iter(feeds.values())))
        if not self._zeros:
            self._zeros = {offset_name(layer): np.zeros((self.batch,) + self.shapes[layer.preact], self.dtype)
                           for layer in self.layers}
        rows = np.arange(self.batch) % n
        padded = {k: v if n == self.batch else v[rows] for k, v in self._cast(feeds).items()}
        run_feeds = {**padded, **self._zeros, **(extra or {}), self.seed_name: seed}
        wanted = fetch + [exposed(z) for z in self.z_outputs]
        try:
            found: dict[str, np.ndarray] = {}
            if self.prefix is not None:
                early = self.prefix.run(self.prefix_outputs, {k: v for k, v in padded.items() if k in self.prefix_inputs})
                found = dict(zip(self.prefix_outputs, early))
                run_feeds.update(found)
            late = [name for name in wanted if name not in found]
            found.update(zip(late, self.session.run(late, {k: v for k, v in run_feeds.items() if k in self.inputs_of})))
        except Exception as exc:  # noqa: BLE001 - a kernel refusing a shape or a value inside the derivative graph
            raise Limitation(f"onnxruntime failed running the derivative graph: {origin(self.model, exc)}") from None
        values = [found[name] for name in wanted]  # the padding dropped; a folded tensor has several rows per sample
        return values if n == self.batch else [v[:n * (len(v) // self.batch)] for v in values]

    def _inputs(self, feeds: dict[str, np.ndarray], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The layer inputs by layer name, a folded layer's rows grouped by sample."""
        z = dict(zip(self.z_outputs, values[len(values) - len(self.z_outputs):]))
        cast = self._cast(feeds)
        n = len(next(iter(feeds.values())))
        return {layer.name: sample_major(layer, z[layer.input] if layer.input in z else cast[layer.input], n)
                for layer in self.layers}


def _plain(node: onnx.NodeProto) -> bool:
    """A node onnx-ad has a rule for and that holds no subgraph (an If, a Loop, a recurrent op is cut off
    into the forward prefix instead)."""
    from onnx_ad.rules import REVERSE

    return (node.domain in ("", "ai.onnx") and node.op_type in REVERSE
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute))


def _drop_dead_nodes(grad: onnx.ModelProto) -> None:
    """Keep only the nodes the outputs need: onnx-ad's Gemm/MatMul rules also build the weights'
    adjoints (a (seeds, out, in) product per layer), which onnxruntime would compute and drop."""
    keep = needed_nodes(grad.graph.node, {vi.name for vi in grad.graph.output})
    del grad.graph.node[:]
    grad.graph.node.extend(keep)


def _fix_batch(m: onnx.ModelProto, batch: int) -> None:
    """Declare the first dimension of every graph input as ``batch``."""
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch


class OutputJacobians(_AdjointModel):
    """Per-sample output derivatives at the pre-activations with K exact or ``probes`` random seeds."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], output: str, output_size: int,
                 probes: int | None = None, seed: int = 0, provider: str = "cpu", threads: int | None = None):
        super().__init__(model, layers, output, provider, threads)
        self.output_size = int(output_size)
        self.exact = probes is None
        self.repeats = self.output_size if probes is None else int(probes)
        self.scale = 1.0 if self.exact else 1.0 / self.repeats
        self.rng = np.random.default_rng(seed)

    def _head(self, m: onnx.ModelProto, elem: int) -> str:
        return exposed(self.output)

    def _seed(self, n: int, output_shape: tuple[int, ...]) -> np.ndarray:
        """(graph batch, *output_shape, R): the identity per sample (exact), or Rademacher signs, fresh
        for the ``n`` real samples (the padding rows repeat them)."""
        if not self.exact:
            signs = rademacher(self.rng, (n,) + tuple(output_shape) + (self.repeats,), self.dtype)
            return signs if n == self.batch else signs[np.arange(self.batch) % n]
        if "eye" not in self._seeds:
            eye = np.eye(self.output_size, dtype=self.dtype).reshape(tuple(output_shape) + (self.repeats,))
            self._seeds["eye"] = np.ascontiguousarray(np.broadcast_to(eye, (self.batch,) + eye.shape))
        return self._seeds["eye"]

    def _layer_rows(self, layer: Layer, d: np.ndarray) -> np.ndarray:
        """(n, *preact, R) -> (n, R, out, positions)."""
        n, r = len(d), d.shape[-1]
        moved = np.moveaxis(d, -1, 1).reshape((n * r,) + d.shape[1:-1])
        return by_position(layer, moved).reshape(n, r, layer.out_features, -1)

    def rows(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]):
        """Per layer the derivatives of every seed, (batch, R, out, positions), and the layer inputs."""
        self._build(feeds)
        n = len(next(iter(feeds.values())))
        fetch = [self.rows_of[layer.name] for layer in self.layers]
        values = self._run(feeds, self._seed(n, output_shape), fetch)
        out = {layer.name: self._layer_rows(layer, d) for layer, d in zip(self.layers, values)}
        return out, self._inputs(feeds, values)

    def squares(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]):
        """Per layer G = sum_k (dy_k/da)^2 (batch, out) for single-use layers (reduced in the graph,
        scaled for random seeds), the rows (batch, R, out, positions) for shared-weight layers; and
        the layer inputs."""
        self._build(feeds)
        n = len(next(iter(feeds.values())))
        fetch = [self.rows_of[layer.name] if layer.shared else SQUARES + layer.name for layer in self.layers]
        values = self._run(feeds, self._seed(n, output_shape), fetch)
        out = {}
        for layer, value in zip(self.layers, values):
            if layer.shared:
                out[layer.name] = self._layer_rows(layer, value)
            else:
                out[layer.name] = value if self.exact else value * value.dtype.type(self.scale)
        return out, self._inputs(feeds, values)


class LossGradients(_AdjointModel):
    """Per-sample d(cross-entropy)/d(pre-activation), for saliencies that use the training loss."""

    def _head(self, m: onnx.ModelProto, elem: int) -> str:
        """-sum(one_hot * log_softmax(y)) per sample, seeded with 1."""
        width = self.shapes[self.output]
        m.graph.input.append(helper.make_tensor_value_info(ONE_HOT, elem, [self.batch, *width]))
        axis = f"{LOSS}__axis"
        m.graph.node.extend([
            helper.make_node("Constant", [], [axis], name=axis, value=numpy_helper.from_array(np.array([-1], np.int64))),
            helper.make_node("LogSoftmax", [self.output], [f"{LOSS}__log_p"], axis=-1, name=f"{LOSS}__log_p"),
            helper.make_node("Mul", [ONE_HOT, f"{LOSS}__log_p"], [f"{LOSS}__picked"], name=f"{LOSS}__picked"),
            helper.make_node("ReduceSum", [f"{LOSS}__picked", axis], [f"{LOSS}__neg"], keepdims=0, name=f"{LOSS}__sum"),
            helper.make_node("Neg", [f"{LOSS}__neg"], [LOSS], name=LOSS)])
        m.graph.output.append(helper.make_tensor_value_info(LOSS, elem, [self.batch]))
        return LOSS

    def __call__(self, feeds: dict[str, np.ndarray], labels: np.ndarray):
        """Per layer dL/da (batch, out) for a 2-D layer, (batch, out, positions) for a shared-weight
        one, and the layer inputs as the graph has them."""
        self._build(feeds)
        n = len(labels)
        width = int(np.prod(self.shapes[self.output]))
        one_hot = np.zeros((n, width), self.dtype)
        one_hot[np.arange(n), labels.astype(np.int64)] = 1
        fetch = [self.rows_of[layer.name] for layer in self.layers]
        if n < self.batch:
            one_hot = one_hot[np.arange(self.batch) % n]
        values = self._run(feeds, np.ones((self.batch, 1), self.dtype), fetch, {ONE_HOT: one_hot})
        out = {}
        for layer, d in zip(self.layers, values):
            g = by_position(layer, d[..., 0].astype(np.float64))
            out[layer.name] = g[:, :, 0] if not layer.shared else g
        return out, self._inputs(feeds, values)
